"""The OpenAI-compatible backend's pure parts: the stream decoder, the error table, the
wait a 429 names, the payloads and what they refuse."""

from __future__ import annotations

import orjson
import pytest

from tokenwire.service import (
    EngineError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    QuotaExhausted,
    TruncatedStream,
    UpstreamBusy,
    UpstreamRateLimited,
    UpstreamUnavailable,
    ValidationFailed,
)
from tokenwire.service.backends.openai._answers import ChatStream
from tokenwire.service.backends.openai._errors import classify_http_error, retry_after
from tokenwire.service.backends.openai._payloads import chat_payload, generate_payload
from tokenwire.v1 import generation_pb2 as pb


def _chunk(delta: dict[str, object] | None = None, finish: str | None = None,
           **extra: object) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return orjson.dumps({"object": "chat.completion.chunk", "model": "m", "choices": choices,
                         **extra})


def test_a_whole_stream_decoded() -> None:
    decode = ChatStream()
    assert decode("message", _chunk({"role": "assistant"})) == ("", "", None, None)  # priming
    assert decode("message", _chunk({"content": "Hi"})) == ("Hi", "", None, None)
    assert decode("message", _chunk({"reasoning_content": "hm"})) == ("", "hm", None, None)
    assert decode("message", _chunk({}, "stop")) == ("", "", None, None)
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert decode("message", _chunk(None, usage=usage)) is None  # the usage chunk
    text, _, calls, final = decode("message", b"[DONE]")
    assert (text, calls) == ("", None) and final is not None
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (4, 2)
    assert final.model == "m"


def test_done_without_a_finish_reason_is_truncated() -> None:
    decode = ChatStream()
    decode("message", _chunk({"content": "Hi"}))
    with pytest.raises(TruncatedStream):
        decode("message", b"[DONE]")


def test_a_finish_reason_without_done_ends_the_answer_at_the_end_of_the_body() -> None:
    decode = ChatStream()
    decode("message", _chunk({"content": "Hi"}, "length"))
    event = decode.end()
    assert event is not None and event[3] is not None
    assert event[3].finish_reason == pb.FINISH_REASON_LENGTH
    assert event[3].usage.completion_tokens == 1  # no usage came: the chunks counted
    assert ChatStream().end() is None  # neither: truncated


def test_tool_call_arguments_that_are_not_json_are_kept_as_text() -> None:
    decode = ChatStream()
    decode("message", _chunk({"tool_calls": [{"index": 0, "id": "c", "function": {
        "name": "f", "arguments": "{'city': Paris"}}]}, "tool_calls"))
    _, _, calls, final = decode("message", b"[DONE]")
    assert calls is not None and final is not None
    assert calls[0].arguments_text == "{'city': Paris" and not calls[0].arguments.fields
    assert final.finish_reason == pb.FINISH_REASON_TOOL_CALLS


def test_stop_after_tool_calls_is_a_tool_calls_finish() -> None:
    decode = ChatStream()
    decode("message", _chunk({"tool_calls": [{"id": "c", "function": {
        "name": "f", "arguments": "{}"}}]}, "stop"))
    final = decode("message", b"[DONE]")[3]
    assert final is not None and final.finish_reason == pb.FINISH_REASON_TOOL_CALLS


def _error(message: str, **fields: object) -> bytes:
    return orjson.dumps({"error": {"message": message, **fields}})


@pytest.mark.parametrize(("status", "body", "headers", "kind", "outage"), [
    (401, _error("bad key"), {}, PermissionDenied, False),
    (404, _error("model 'x' not found", code="model_not_found"), {}, ModelNotFound, False),
    (404, b'{"detail":"Not Found"}', {}, EngineError, False),
    (429, _error("slow down", code="rate_limit_exceeded"), {"Retry-After": "3"},
     UpstreamRateLimited, False),
    (429, _error("quota", code="insufficient_quota"), {}, QuotaExhausted, False),
    (503, _error("Loading model", type="unavailable_error"), {}, UpstreamBusy, True),
    (400, orjson.dumps({"object": "error", "message": "bad", "code": 400}), {},
     InvalidRequest, False),
    (500, _error("1 validation error: max_tokens must be positive"), {}, InvalidRequest,
     False),
    (500, _error("CUDA out of luck"), {}, EngineError, False),
    (502, b"<html>bad gateway</html>", {}, UpstreamUnavailable, True),
])
def test_who_failed(status: int, body: bytes, headers: dict[str, str], kind: type,
                    outage: bool) -> None:
    exc = classify_http_error(status, body, headers, "x", "/chat/completions")
    assert type(exc) is kind and exc.outage is outage


def test_a_rate_limit_names_its_wait_and_a_quota_is_not_retryable() -> None:
    limited = classify_http_error(429, _error("slow"), {"retry-after-ms": "250"}, "x", "/p")
    assert limited.retryable and limited.retry_after == pytest.approx(0.25)
    spent = classify_http_error(429, _error("quota", code="insufficient_quota"),
                                {"Retry-After": "3"}, "x", "/p")
    assert not spent.retryable and spent.retry_after is None


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"Retry-After": "12"}, 12.0), ({"retry-after-ms": "1500"}, 1.5),
    ({"x-ms-retry-after-ms": "40"}, 0.04), ({"Retry-After": "-1"}, None),
    ({"Retry-After": "0"}, None), ({"Retry-After": "soon"}, None), ({}, None),
])
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    got = retry_after(headers)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_as_an_http_date() -> None:
    import time
    from email.utils import formatdate

    got = retry_after({"Retry-After": formatdate(time.time() + 30, usegmt=True)})
    assert got is not None and 25 < got <= 31


def test_generate_as_chat_and_what_is_refused() -> None:
    path, payload, kind = generate_payload(pb.GenerateRequest(
        model="m", prompt="p", system="s", images=[b"\x89PNG...."],
        options=pb.Options(max_tokens=-1)), backend="hosted")
    assert (path, kind) == ("/chat/completions", "chat")
    assert payload["messages"][0] == {"role": "system", "content": "s"}
    assert payload["messages"][1]["content"][1]["image_url"]["url"].startswith(
        "data:image/png;base64,")
    assert "max_tokens" not in payload  # -1: no limit, the API's default
    with pytest.raises(ValidationFailed) as info:
        chat_payload(pb.ChatRequest(model="m", messages=[pb.Message(role=pb.ROLE_USER)],
                                    keep_alive={"seconds": 5},
                                    options=pb.Options(repeat_penalty=1.1)), backend="hosted")
    assert [f for f, _ in info.value.violations] == ["options.repeat_penalty", "keep_alive"]
    assert all("'hosted'" in d for _, d in info.value.violations)
