"""How Ollama's error answers become exceptions: pure functions, no I/O.

The question each answer is asked first is *who failed*: the engine (an outage:
it counts towards the circuit breaker and may be retried before the first token)
or this one request (the engine is alive and refuses it; never retried, never
counted, whatever its words). Only then is the wording used, to name the field
and to pick between a request error and an engine error.

    HTTP answer                              exception (outage?)
    404 "model ... not found"                ModelNotFound
    404 other, 405                           EngineError: --ollama-url is not Ollama's API
    401 / 403                                PermissionDenied
    429                                      UpstreamRateLimited: retryable, not an outage
    503                                      UpstreamBusy (outage)
    other 4xx                                InvalidRequest
    any status, runner-failure text          RunnerCrashed (outage)
    500 + a well-formed {"error": text}      InvalidRequest when the text points at the
                                             request, else EngineError (not an outage)
    5xx without a well-formed error body     UpstreamUnavailable (outage): a proxy's 502/504
                                             page, an empty body, a crash

Ollama labels several request errors 500 (``option "x" must be of type ...``,
``invalid format``, ``invalid JSON schema in format``): that is why a 500 from a
live engine is not taken as an outage. Error bodies arrive already cut to a bound
by the adapter, and every text put into a message is cut again (``excerpt``).
"""

from __future__ import annotations

from ..._exceptions import (
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
    excerpt,
)
from .._words import engine_said, points_at_request

__all__ = ["ENGINE_TEXT_BYTES", "classify_http_error", "engine_said", "runner_failed",
           "stream_error"]  # engine_said: re-exported for the real tier's catalogue

#: How much of the engine's own words a message quotes, in UTF-8 bytes.
ENGINE_TEXT_BYTES = 400

#: Texts by which Ollama (v0.20-v0.24: llm/server.go, server/sched.go) says its model
#: runner, not the request, failed.
_RUNNER_FAILED = (
    "model runner has unexpectedly stopped",
    "an error was encountered while running the model",
    "llama runner process has terminated",
    "llama runner process no longer running",
    "timed out waiting for llama runner to start",
    "model failed to load",
    "error starting runner",
    "unexpected server status",
    "no slots available",
)
#: Request errors Ollama is known to answer with HTTP 500 (matched at the start).
_KNOWN_REQUEST_500 = ('option "', "invalid format", "invalid json schema")
#: (marker in the text, request field it is about), first match wins.
_FIELDS = (
    ("json schema", "format"),
    ("invalid format", "format"),
    ("support thinking", "think"),
    ("invalid think", "think"),
    ("support tools", "tools"),
    ("support vision", "images"),
    ("base64", "images"),
    ("raw mode", "raw"),
    ("support insert", "suffix"),
    ("context length", "prompt"),
    ("invalid model name", "model"),
    (":local or :cloud", "model"),
    ("model is required", "model"),
    ("invalid input type", "inputs"),
    ("duration", "keep_alive"),
)


def runner_failed(text: str) -> bool:
    """Whether the text says the model runner (not the request) failed."""
    return any(marker in text for marker in _RUNNER_FAILED)


#: Where each endpoint's input text is, in the request (``prompt`` for /api/generate).
_INPUT_FIELD = {"/api/chat": "messages", "/api/embed": "inputs"}


def _field_of(text: str, path: str) -> str:
    if text.startswith('option "'):
        return "options." + text.split('"', 2)[1]
    lowered = text.lower()
    field = next((field for marker, field in _FIELDS if marker in lowered), "")
    return _INPUT_FIELD.get(path, field) if field == "prompt" else field


def classify_http_error(status: int, body: bytes, model: str, path: str = "") -> UpstreamError:
    """Turns a non-200 answer from Ollama to a request for ``path`` into an exception
    (table in the module doc)."""

    def rejected() -> InvalidRequest:
        return InvalidRequest(f"Ollama rejected the request: {text}", http_status=status,
                              field=_field_of(text, path))

    said = engine_said(body)
    raw = said if said is not None else body.decode("utf-8", "replace").strip()
    text = excerpt(raw, ENGINE_TEXT_BYTES)
    if status == 404 and said is not None and said.startswith("model") and "not found" in said:
        return ModelNotFound(
            model,
            f"model '{excerpt(model, 200)}' is not installed in Ollama; pull it first "
            f"(`ollama pull {excerpt(model, 200)}`) or choose one listed by ListModels",
            http_status=status,
        )
    if status in (404, 405):
        return EngineError(
            f"Ollama answered {status} ({text or 'no body'}); is --ollama-url pointing at "
            "Ollama?", http_status=status)
    if status in (401, 403):
        return PermissionDenied(
            f"Ollama refused the request with HTTP {status}"
            + (f": {text}" if text else " (on a loopback bind, Ollama checks the Host header)"),
            http_status=status,
        )
    if status == 429:
        return UpstreamRateLimited(f"Ollama is rate limiting ({text or 'HTTP 429'}); retry "
                                   "later", http_status=status)
    if status == 503:
        return UpstreamBusy(f"Ollama is busy ({text or 'HTTP 503'}); retry later",
                            http_status=status)
    if said is not None and runner_failed(said):
        return RunnerCrashed(f"Ollama's model runner failed: {text}", http_status=status)
    if 400 <= status < 500:
        return rejected()
    if status == 500 and said is not None:
        # A live engine refusing this request: never an outage, whatever the words.
        if said.lower().startswith(_KNOWN_REQUEST_500) or points_at_request(said):
            return rejected()
        return EngineError(f"Ollama could not run this request (HTTP 500): {text}",
                           http_status=status, outage=False)
    return UpstreamUnavailable(f"Ollama failed with HTTP {status}: {text or 'no body'}",
                               http_status=status)


def stream_error(error: object) -> StreamError:
    """The exception for an ``{"error": ...}`` line inside a 200 stream."""
    text = excerpt(str(error), ENGINE_TEXT_BYTES)
    if runner_failed(text):
        return RunnerCrashed(f"Ollama's model runner failed mid-stream: {text}")
    return StreamError(f"Ollama reported an error mid-stream: {text}")
