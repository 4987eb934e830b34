"""The classifier: who failed (the engine, or this one request) decides before the words do."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwire.service import (
    EngineError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RunnerCrashed,
    StreamError,
    UpstreamBusy,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
    status_for,
)
from tokenwire.service._exceptions import MAX_MESSAGE_BYTES, excerpt
from tokenwire.service.backends.ollama._errors import (
    classify_http_error,
    runner_failed,
    stream_error,
)


def _body(text: str) -> bytes:
    return orjson.dumps({"error": text})


def _classify(status: int, body: bytes) -> UpstreamError:
    return classify_http_error(status, body, "m")


@pytest.mark.parametrize(
    ("status", "body", "kind", "outage", "field"),
    [
        # Ollama's request errors that it labels 500 (v0.24.0, seen on the wire).
        (500, _body("invalid JSON schema in format"), InvalidRequest, False, "format"),
        (500, _body('option "temperature" must be of type float32'), InvalidRequest, False,
         "options.temperature"),
        (500, _body('invalid format: "\\"yaml\\""; expected "json" or a valid JSON Schema '
                    "object"), InvalidRequest, False, "format"),
        # Wording nobody taught the classifier, from a live engine: never an outage.
        (500, _body("grammar rule 'root' references an undefined symbol"), EngineError, False,
         ""),
        (500, _body("the frobnicator is misaligned"), EngineError, False, ""),
        (500, _body("value for knob 'x' must be positive"), InvalidRequest, False, ""),
        (500, _body("model requires more system memory (9.1 GiB) than is available (2 GiB)"),
         EngineError, False, ""),
        # The runner failed: an outage, whatever the status.
        (500, _body("model runner has unexpectedly stopped, this may be due to resource "
                    "limitations or an internal error, check ollama server logs for details"),
         RunnerCrashed, True, ""),
        (500, _body("llama runner process has terminated: signal: killed"), RunnerCrashed, True,
         ""),
        (500, _body("timed out waiting for llama runner to start - progress 0.00 - "),
         RunnerCrashed, True, ""),
        # No well-formed engine error: a proxy's page or a crash, so an outage.
        (502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", UpstreamUnavailable, True,
         ""),
        (504, b"<html>Gateway Time-out</html>", UpstreamUnavailable, True, ""),
        (500, b"", UpstreamUnavailable, True, ""),
        (500, b"Internal Server Error", UpstreamUnavailable, True, ""),
        (500, _body(""), UpstreamUnavailable, True, ""),
        (503, _body("server busy, please try again.  maximum pending requests exceeded"),
         UpstreamBusy, True, ""),
        # Quotas and refusals are not outages.
        (429, _body("rate limit exceeded"), UpstreamRateLimited, False, ""),
        (403, b"", PermissionDenied, False, ""),
        (400, _body("invalid model name"), InvalidRequest, False, "model"),
        (400, _body('time: missing unit in duration "300"'), InvalidRequest, False,
         "keep_alive"),
        (400, _body("the input length exceeds the context length"), InvalidRequest, False,
         "prompt"),
        (413, b"Request Entity Too Large", InvalidRequest, False, ""),
        (404, _body("model 'm' not found"), ModelNotFound, False, "model"),
        (404, b"404 page not found", EngineError, False, ""),
        (405, b"405 method not allowed", EngineError, False, ""),
        # OpenAI's error shape is read too.
        (500, orjson.dumps({"error": {"message": "unknown parameter 'x'", "type": "bad"}}),
         InvalidRequest, False, ""),
    ],
)
def test_who_failed_decides_before_the_words(status: int, body: bytes, kind: type, outage: bool,
                                             field: str) -> None:
    exc = _classify(status, body)
    assert type(exc) is kind
    assert exc.outage is outage
    assert exc.field == field
    assert exc.http_status == status


@settings(max_examples=400, deadline=None)
@given(text=st.text(min_size=1, max_size=3000).filter(lambda t: t.strip()))
def test_a_live_engine_refusing_is_never_an_outage_whatever_it_says(text: str) -> None:
    """The class, not the instance: any words in a well-formed 500 error from a live engine
    give a non-retryable answer that leaves the breaker alone (a runner-failure text is the
    one exception, and says so)."""
    exc = _classify(500, _body(text))
    if isinstance(exc, RunnerCrashed):
        assert runner_failed(text)
        return
    assert not exc.outage
    assert isinstance(exc, InvalidRequest | EngineError)
    status = status_for(exc)
    assert status.code.name in ("INVALID_ARGUMENT", "INTERNAL")
    assert len(status.details.encode()) <= 2048
    shown = excerpt(text, 60).split(" ... [cut")[0]
    assert shown in exc.message  # the engine's own words reach the caller


def test_a_huge_error_body_becomes_a_short_message() -> None:
    page = b"<html>" + b"x" * (20 << 20) + b"</html>"
    exc = _classify(502, page)
    assert len(exc.message.encode()) <= MAX_MESSAGE_BYTES
    assert "[cut:" in exc.message and "<html>xxx" in exc.message
    status = status_for(exc)
    assert len(status.details.encode()) <= 2048
    assert sum(len(v) for _, v in status.trailing_metadata) < 4096


def test_excerpt_cuts_on_a_character_boundary() -> None:
    text = "é" * 1000  # two bytes each
    cut = excerpt(text, 101)
    assert len(cut.encode()) <= 101
    assert cut.startswith("é" * 10) and cut.endswith("2000 bytes in all]")
    assert excerpt("short", 101) == "short"


def test_an_error_line_mid_stream() -> None:
    assert isinstance(stream_error("an error was encountered while running the model: "
                                   "unexpected EOF"), RunnerCrashed)
    plain = stream_error("error reading llm response: boom")
    assert type(plain) is StreamError and not plain.outage
    huge = stream_error("y" * (6 << 20))
    assert len(huge.message.encode()) <= MAX_MESSAGE_BYTES
