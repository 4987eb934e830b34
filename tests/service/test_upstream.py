"""The Ollama adapter, against httpx.MockTransport: status and NDJSON handling."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tokenwire.service import (
    EngineError,
    InvalidRequest,
    ModelNotFound,
    OllamaBackend,
    PermissionDenied,
    ProtocolError,
    RunnerCrashed,
    StreamError,
    TruncatedStream,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamDisconnected,
)
from tokenwire.service.backends.ollama._answers import generate_event
from tokenwire.v1 import generation_pb2 as pb


def _ndjson(*objs: dict[str, object]) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def _upstream(handler: httpx.MockTransport) -> OllamaBackend:
    return OllamaBackend("http://ollama.test", transport=handler)


async def _collect(upstream: OllamaBackend, payload: dict[str, object] | None = None) -> list:
    async with upstream.post_stream("/api/generate", payload or {"model": "m"},
                                    ("ndjson", generate_event)) as chunks:
        return [c async for c, _ in chunks]


DONE = {"model": "m", "response": "", "done": True, "done_reason": "stop", "eval_count": 2}


async def test_stream_parses_lines_split_across_reads() -> None:
    body = _ndjson({"response": "Hel", "done": False}, {"response": "lo", "done": False}, DONE)

    async def pieces():  # deliberately cut lines in odd places
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=pieces()))
    chunks = await _collect(_upstream(transport))
    assert [c[0] for c in chunks] == ["Hel", "lo", ""]
    assert chunks[-1][3] is not None


async def test_plain_json_body_without_newline_is_one_chunk() -> None:
    body = orjson.dumps({"model": "m", "response": "", "done": True, "done_reason": "load"})
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body))
    [(text, _, _, final)] = await _collect(_upstream(transport))
    assert text == "" and final is not None
    assert final.finish_reason == pb.FINISH_REASON_LOAD


async def test_request_body_is_the_payload() -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, content=_ndjson(DONE))

    await _collect(_upstream(httpx.MockTransport(handler)), {"model": "m", "prompt": "p"})
    assert orjson.loads(seen[0]) == {"model": "m", "prompt": "p"}


async def test_error_line_mid_stream_raises_after_earlier_chunks() -> None:
    body = _ndjson({"response": "a", "done": False}, {"error": "error reading llm response"})
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body))
    got = []
    with pytest.raises(StreamError, match="error reading llm response"):
        async with _upstream(transport).post_stream("/api/generate", {"model": "m"},
                                                    ("ndjson", generate_event)) as chunks:
            async for c, _ in chunks:
                got.append(c)
    assert [c[0] for c in got] == ["a"]


async def test_runner_crash_line_is_its_own_class() -> None:
    body = _ndjson({"error": "an error was encountered while running the model: boom"})
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body))
    with pytest.raises(RunnerCrashed):
        await _collect(_upstream(transport))


async def test_eof_without_done_is_truncated() -> None:
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, content=_ndjson({"response": "a", "done": False})))
    with pytest.raises(TruncatedStream) as info:
        await _collect(_upstream(transport))
    assert not isinstance(info.value, UpstreamDisconnected)


async def test_non_json_line_is_protocol_error() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=b"<html>\n"))
    with pytest.raises(ProtocolError):
        await _collect(_upstream(transport))


async def test_read_error_mid_stream_is_disconnect() -> None:
    async def pieces():
        yield _ndjson({"response": "a", "done": False})
        raise httpx.ReadError("connection reset")

    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=pieces()))
    with pytest.raises(UpstreamDisconnected, match="incomplete"):
        await _collect(_upstream(transport))


async def test_connect_error_names_the_url() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(UpstreamConnectError, match=r"http://ollama\.test"):
        await _collect(_upstream(httpx.MockTransport(refuse)))


@pytest.mark.parametrize(
    ("status", "body", "expected", "field"),
    [
        (404, {"error": "model 'nope' not found"}, ModelNotFound, "model"),
        (400, {"error": '"m" does not support thinking'}, InvalidRequest, "think"),
        (500, {"error": 'option "temperature" must be of type float32'}, InvalidRequest,
         "options.temperature"),
        (500, {"error": 'invalid format: "yaml"; expected "json" or a valid JSON Schema object'},
         InvalidRequest, "format"),
        (503, {"error": "server busy, please try again.  maximum pending requests exceeded"},
         UpstreamBusy, ""),
        (403, None, PermissionDenied, ""),
        (500, {"error": "model runner has unexpectedly stopped, this may be due to ..."},
         RunnerCrashed, ""),
        (500, {"error": "template: bad"}, EngineError, ""),
        (404, "404 page not found", EngineError, ""),
    ],
)
async def test_http_errors_are_classified(status: int, body: object, expected: type,
                                          field: str) -> None:
    content = b"" if body is None else body.encode() if isinstance(body, str) else orjson.dumps(
        body)
    transport = httpx.MockTransport(lambda r: httpx.Response(status, content=content))
    with pytest.raises(expected) as info:
        await _collect(_upstream(transport), {"model": "nope"})
    assert type(info.value) is expected
    assert info.value.http_status == status
    assert info.value.field == field


async def test_model_not_found_message_says_to_pull() -> None:
    transport = httpx.MockTransport(
        lambda r: httpx.Response(404, content=b'{"error":"model \'nope\' not found"}'))
    with pytest.raises(ModelNotFound, match=r"ollama pull nope"):
        await _collect(_upstream(transport), {"model": "nope"})


async def test_json_endpoints() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/version":
            return httpx.Response(200, json={"version": "0.24.0"})
        if request.url.path == "/api/tags":
            return httpx.Response(200, json={"models": []})
        body = {"error": 'model "e" not found, try pulling it first'}
        return httpx.Response(404, json=body)

    upstream = _upstream(httpx.MockTransport(handler))
    assert await upstream.version() == "0.24.0"
    assert await upstream.models() == []
    with pytest.raises(ModelNotFound):
        await upstream.embed(pb.EmbedRequest(model="e", inputs=["x"]))
    await upstream.aclose()
