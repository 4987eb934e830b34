"""An OpenAI-compatible HTTP/1.1 server on a loopback socket, for fault injection.

Built like ``tests/fakeollama.py`` (whose connection layer it reuses): plain
``asyncio.start_server`` in the test's own event loop, every request recorded, and a reader task
per connection that sees a client disconnect at the socket at once, however long the fake is
waiting between tokens. It serves ``/v1/chat/completions`` (SSE streaming and whole),
``/v1/completions``, ``/v1/embeddings``, ``/v1/models`` and ``/v1/models/{id}``.

Three wire dialects (``dialect=``), each taken from what the real server sent
(scripts/openai-wire-notes.md; ``tests/real/test_openai_wire_parity.py`` keeps them honest):

``"openai"``
    The API reference: priming delta ``{"role": "assistant", "content": "", "refusal": null}``,
    ``usage: null`` on every chunk when ``stream_options.include_usage`` is set and a last chunk
    with ``choices: []`` and the usage; errors ``{"error": {"message", "type", "param", "code"}}``;
    ``/health`` answers ``{"status": "ok"}`` as llama.cpp's C++ server and vLLM do.
``"ollama"``
    Ollama v0.24.0's ``/v1``: compact Go JSON (``<``, ``>``, ``&`` escaped), no priming delta,
    ``role`` on every delta, ``system_fingerprint: "fp_ollama"``, headers sent with the first
    event, the final chunk, the usage chunk and ``[DONE]`` in one network write, unknown models
    404, ``tools`` on a model without them 400, bodies over 2 KiB chunked.
``"llama-cpp-python"``
    ``python -m llama_cpp.server`` 0.3.36 (uvicorn + sse-starlette): Python ``json.dumps`` with
    spaces in stream events, priming ``{"role": "assistant"}``, final delta ``{}``,
    ``stream_options.include_usage`` ignored (no usage in a stream at all), any model name
    served, validation errors as HTTP 500, a context overflow as 400 (whole) or as a 200 event
    stream with no event at all (streaming), ``{"detail": ...}`` for unknown paths.

Faults (:class:`Fault`) cover what a backend must survive: events split across network writes
at odd byte offsets, ``: keepalive`` comments, CRLF and CR line endings, an event spread over
several ``data:`` lines, a stream ending without ``[DONE]`` (with or without a finish_reason), an
error event after HTTP 200 (``data: {"error": ...}`` or ``event: error``), error statuses in the
OpenAI, flat vLLM/FastChat and nested-int shapes, 429 with ``Retry-After`` (seconds or HTTP date)
and ``retry-after-ms``, quota exhaustion, llama.cpp's 503 "Loading model", a dropped connection,
hangs and slow first tokens. Server attributes add tool-call deltas (well-formed or broken in the
ways real servers break them), reasoning deltas and any ``finish_reason``.

Usage::

    async with FakeOpenAI(tokens=["Hi", " there"], token_delay=0.05) as fake:
        fake.set_fault(Fault(split_every=7, newline="\\r\\n"))
        ...  # point the code under test at fake.url + "/v1"
        await fake.wait_for_disconnect()
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Literal

import orjson

from tests.fakeollama import (
    Request,
    StreamRecord,
    _BadRequest,
    _Conn,
    _embedding,
    _head,
)
from tests.fakeollama import (
    _json as _go_json,
)

__all__ = [
    "DEFAULT_TOKENS",
    "Dialect",
    "FakeOpenAI",
    "Fault",
    "Request",
    "StreamRecord",
    "ToolCall",
]

#: The pieces an answer streams by default, one per chunk (note the non-ASCII one).
DEFAULT_TOKENS: tuple[str, ...] = ("The", " sky", " is", " blue", " – ", "mostly", ".")

Dialect = Literal["openai", "ollama", "llama-cpp-python"]
#: How tool-call deltas are cut: "indexed" as the spec says (id, type and name once, then
#: argument pieces); "repeated" as llama-cpp-python does (every piece repeats index, id, type
#: and name); "whole" all calls in one chunk (Ollama); broken: "no_index" (Ollama #7881),
#: "index0" (every call at index 0, told apart by a new id), "object_args" (arguments as a JSON
#: object, not a string).
ToolCallStyle = Literal["indexed", "repeated", "whole", "no_index", "index0", "object_args"]

_SSE = "text/event-stream"
_SSE_UTF8 = "text/event-stream; charset=utf-8"
_JSON = "application/json"
_JSON_UTF8 = "application/json; charset=utf-8"
#: Go's net/http buffers this much of a handler's output before it switches to chunked.
_GO_BUFFER = 2048
#: llama-cpp-python does not normalise pooled embeddings; SmolLM2's mean-pooled vectors have a
#: norm of about 41, so the fake scales its unit vectors by this.
_LLAMA_EMBED_NORM = 41.0


# --------------------------------------------------------------------------------------------
# Public records


@dataclass(frozen=True)
class ToolCall:
    """One tool call the fake's answer makes; ``arguments`` is the JSON text."""

    name: str
    arguments: str = "{}"
    id: str | None = None


@dataclass
class Fault:
    """What the next matching request(s) do instead of (or on top of) a normal answer.

    Chat and completion requests match every fault; other paths only ``status`` and ``hang``.
    ``paths`` narrows matching to the listed paths; ``times`` limits how many requests match.
    ``*_after`` count the SSE data events already written (the priming delta counts, ``[DONE]``
    does not); on a whole (``stream: false``) answer ``drop_after`` / ``hang_after`` act before
    the reply and ``error_after`` gives a 500. At the same count the order is drop, error,
    truncate, hang.
    """

    # -- before the answer
    status: int | None = None
    message: str = "fault injected by FakeOpenAI"
    #: Error ``type``; default from the status (invalid_request_error, rate_limit_error, …).
    error_type: str | None = None
    #: Error ``code``: a string in the OpenAI shape, the status as an int in the others.
    error_code: str | int | None = None
    error_param: str | None = None
    #: "openai": ``{"error": {...}}`` with a string code; "flat": vLLM/FastChat
    #: ``{"object": "error", "message", "type", "param", "code": <int>}``; "vllm": newer vLLM's
    #: ``{"error": {...}}`` with an int code.
    error_shape: Literal["openai", "flat", "vllm"] = "openai"
    #: The whole error body instead (sent with ``content_type``), e.g. a proxy's HTML page.
    error_body: bytes | None = None
    content_type: str = _JSON
    #: Extra response headers (Retry-After, retry-after-ms, x-ratelimit-*), on any status.
    headers: tuple[tuple[str, str], ...] = ()
    hang: bool = False
    delay_first: float = 0.0
    # -- framing of a stream
    #: Write every event in pieces of this many bytes, each its own write and HTTP chunk.
    split_every: int | None = None
    split_delay: float = 0.002
    #: Write ``comment`` (one SSE comment line) before every Nth event, starting before the first.
    comment_every: int | None = None
    comment: str = ": keepalive"
    newline: Literal["\n", "\r\n", "\r"] = "\n"
    #: Spread each JSON event over several ``data:`` lines (they join with "\n").
    multiline_data: bool = False
    # -- how a stream ends
    error_after: int | None = None
    #: "data": ``data: {"error": {...}}``; "event": ``event: error`` + ``data: {...}``.
    error_style: Literal["data", "event"] = "data"
    drop_after: int | None = None
    #: End the stream cleanly after N events: no finish_reason chunk, no usage, no ``[DONE]``
    #: unless ``done_on_truncate`` (llama-cpp-python does that when a new request interrupts).
    truncate_after: int | None = None
    done_on_truncate: bool = False
    #: The full answer, finish_reason and usage included, but no ``data: [DONE]``.
    omit_done: bool = False
    hang_after: int | None = None
    times: int | None = None
    paths: tuple[str, ...] | None = None

    @classmethod
    def rate_limited(
        cls, retry_after: str | None = "1", retry_after_ms: int | None = None, **kw: Any
    ) -> Fault:
        """HTTP 429 ``rate_limit_exceeded`` with Retry-After (seconds or an HTTP date)."""
        headers = tuple(kw.pop("headers", ()))
        if retry_after is not None:
            headers += (("Retry-After", retry_after),)
        if retry_after_ms is not None:
            headers += (("retry-after-ms", str(retry_after_ms)),)
        kw.setdefault("message", "Rate limit reached for requests. Please try again later.")
        kw.setdefault("error_code", "rate_limit_exceeded")
        return cls(status=429, error_type="requests", headers=headers, **kw)

    @classmethod
    def quota_exhausted(cls, **kw: Any) -> Fault:
        """HTTP 429 whose code says the quota is gone: not worth retrying."""
        kw.setdefault(
            "message",
            "You exceeded your current quota, please check your plan and billing details.",
        )
        return cls(
            status=429, error_type="insufficient_quota", error_code="insufficient_quota", **kw
        )

    @classmethod
    def loading(cls, **kw: Any) -> Fault:
        """llama.cpp's server while it loads the model (any path, /health included)."""
        body = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
        return cls(status=503, error_body=body, content_type=_JSON_UTF8, **kw)

    @staticmethod
    def http_date(seconds_from_now: float) -> str:
        """An HTTP-date ``seconds_from_now`` in the future, for Retry-After."""
        return formatdate(time.time() + seconds_from_now, usegmt=True)

    def _matches(self, path: str, generating: bool) -> bool:
        if self.paths is not None and path not in self.paths:
            return False
        return generating or self.status is not None or self.hang

    def _action(self, sent: int) -> str | None:
        for name, after in (
            ("drop", self.drop_after),
            ("error", self.error_after),
            ("truncate", self.truncate_after),
            ("hang", self.hang_after),
        ):
            if after == sent:
                return name
        return None


_NO_FAULT = Fault()

_DEFAULT_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def _fault_error(fault: Fault) -> dict[str, Any]:
    status = fault.status or 500
    kind = fault.error_type or _DEFAULT_ERROR_TYPES.get(status, "server_error")
    code: str | int | None = fault.error_code
    if fault.error_shape != "openai" and not isinstance(code, int):
        code = status  # vLLM and FastChat put the HTTP status there
    if fault.error_shape == "flat":
        return {
            "object": "error",
            "message": fault.message,
            "type": kind,
            "param": fault.error_param,
            "code": code,
        }
    return {
        "error": {"message": fault.message, "type": kind, "param": fault.error_param, "code": code}
    }


# --------------------------------------------------------------------------------------------
# Dialects: how one server lays out its JSON, headers and errors


def _py_json(obj: Any) -> bytes:
    """Python's json.dumps defaults (", " and ": ", ASCII only), as sse events in
    llama-cpp-python are made."""
    return json.dumps(obj).encode()


def _compact(obj: Any) -> bytes:
    return orjson.dumps(obj)


class _Wire:
    """The OpenAI reference dialect; subclasses override what their server does differently."""

    name: Dialect = "openai"
    sse_type = _SSE_UTF8
    #: Headers go out before the first event (False: with it, as Go's net/http does).
    head_early = True
    #: The final chunk, the usage chunk and [DONE] go out in one network write.
    tail_in_one_write = False
    reasoning_field = "reasoning_content"
    tool_call_style: ToolCallStyle = "indexed"
    honours_include_usage = True

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake

    # -- encoding
    def event_json(self, obj: Any) -> bytes:
        return _compact(obj)

    def body_json(self, obj: Any) -> tuple[bytes, str]:
        return _compact(obj), _JSON

    def whole_chunked(self, body: bytes) -> bool:
        return False

    def stream_headers(self) -> list[tuple[str, str]]:
        return [
            ("Content-Type", self.sse_type),
            ("Cache-Control", "no-cache"),
            ("x-request-id", f"req_{uuid.uuid4().hex}"),
            ("openai-processing-ms", "1"),
        ]

    def json_headers(self) -> list[tuple[str, str]]:
        return [("x-request-id", f"req_{uuid.uuid4().hex}"), ("openai-processing-ms", "1")]

    # -- ids and chunks
    def new_id(self, completion: bool) -> str:
        return ("cmpl-" if completion else "chatcmpl-") + uuid.uuid4().hex[:24]

    def chunk(
        self, a: _Answer, choices: list[dict[str, Any]], usage: Any = None, with_usage: bool = False
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": a.id,
            "object": a.object,
            "created": a.created,
            "model": a.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if with_usage:
            obj["usage"] = usage
        return obj

    def priming(self) -> dict[str, Any] | None:
        return {"role": "assistant", "content": "", "refusal": None}

    def delta(self, fields: dict[str, Any]) -> dict[str, Any]:
        return fields

    def final_delta(self) -> dict[str, Any]:
        return {}

    def chat_choice(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def text_choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def usage(self, a: _Answer) -> dict[str, Any]:
        return {
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": a.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def usage_on_every_chunk(self, a: _Answer) -> bool:
        """Whether non-final chunks carry a ``usage`` key (null): the spec says so."""
        return a.include_usage

    def whole_chat(self, a: _Answer, message: dict[str, Any], finish: str) -> dict[str, Any]:
        return {
            "id": a.id,
            "object": "chat.completion",
            "created": a.created,
            "model": a.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": self.usage(a),
            "system_fingerprint": None,
        }

    def message(self, content: str | None, reasoning: str, calls: list[dict[str, Any]]) -> Any:
        msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if reasoning:
            msg[self.reasoning_field] = reasoning
        if calls:
            msg["tool_calls"] = calls
        return msg

    def whole_text(self, a: _Answer, text: str, finish: str) -> dict[str, Any]:
        return {
            "id": a.id,
            "object": "text_completion",
            "created": a.created,
            "model": a.model,
            "choices": [self.text_choice(text, finish)],
            "usage": self.usage(a),
            "system_fingerprint": None,
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_entry(m) for m in self.fake.models]}

    def model_entry(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.fake.created, "owned_by": "system"}

    def embeddings(self, model: str, vectors: list[Any], tokens: int) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def embedding_norm(self) -> float:
        return 1.0

    # -- errors: (status, body, content type) or None to go on
    def error(
        self,
        status: int,
        message: str,
        kind: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> tuple[int, bytes, str]:
        kind = kind or _DEFAULT_ERROR_TYPES.get(status, "server_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return (status, *self.body_json(body))

    def not_found(self, path: str) -> tuple[int, bytes, str]:
        return self.error(404, f"Invalid URL (GET {path})")

    def bad_method(self, method: str, path: str) -> tuple[int, bytes, str]:
        return self.error(405, f"Invalid method for URL ({method} {path})")

    def bad_json(self, raw: bytes) -> tuple[int, bytes, str]:
        return self.error(
            400,
            "We could not parse the JSON body of your request. (HINT: This "
            "likely means you aren't using your HTTP library correctly. The OpenAI "
            "API expects a JSON payload, but what was sent was not valid JSON.",
        )

    def not_an_object(self, path: str, value: Any) -> tuple[int, bytes, str]:
        return self.bad_json(orjson.dumps(value))

    def bad_type(self, path: str, name: str, value: Any, want: str) -> tuple[int, bytes, str]:
        return self.error(
            400,
            f"Invalid type for '{name}': expected {want}, but got {_kind(value)} instead.",
            param=name,
            code="invalid_type",
        )

    def missing(self, path: str, body: dict[str, Any], name: str) -> tuple[int, bytes, str] | None:
        return self.error(
            400,
            f"Missing required parameter: '{name}'.",
            param=name,
            code="missing_required_parameter",
        )

    def empty_messages(self) -> tuple[int, bytes, str] | None:
        return self.error(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum "
            "length 1, but got an empty array instead.",
            param="messages",
            code="empty_array",
        )

    def unknown_model(self, path: str, model: str) -> tuple[int, bytes, str] | None:
        return self.error(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )

    def no_tools(self, model: str) -> tuple[int, bytes, str] | None:
        return None

    def response_format(self, value: Any) -> tuple[int, bytes, str] | None:
        return None

    def overflow(self, a: _Answer, window: int, stream: bool) -> tuple[int, bytes, str] | None:
        return self.error(
            400,
            f"This model's maximum context length is {window} tokens. "
            f"However, your messages resulted in {a.prompt_tokens} tokens. Please "
            "reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )

    def model_route(self, name: str) -> tuple[int, bytes, str]:
        if name in self.fake.models:
            return (200, *self.body_json(self.model_entry(name)))
        return self.error(
            404, f"The model '{name}' does not exist", param="model", code="model_not_found"
        )

    def health(self) -> tuple[int, bytes, str] | None:
        return (200, b'{"status":"ok"}', _JSON_UTF8)


class _OllamaWire(_Wire):
    """Ollama v0.24.0's /v1 (middleware/openai.go over the native handlers)."""

    name: Dialect = "ollama"
    sse_type = _SSE
    head_early = False
    tail_in_one_write = True
    reasoning_field = "reasoning"
    tool_call_style: ToolCallStyle = "whole"

    def event_json(self, obj: Any) -> bytes:
        return _go_json(obj)

    def body_json(self, obj: Any) -> tuple[bytes, str]:
        # json.NewEncoder: a trailing newline, no charset.
        return _go_json(obj) + b"\n", _JSON

    def whole_chunked(self, body: bytes) -> bool:
        return len(body) > _GO_BUFFER

    def stream_headers(self) -> list[tuple[str, str]]:
        return [("Content-Type", _SSE)]

    def json_headers(self) -> list[tuple[str, str]]:
        return []

    def new_id(self, completion: bool) -> str:
        n = next(self.fake._ids) % 999
        return f"cmpl-{n}" if completion else f"chatcmpl-{n}"

    def chunk(
        self, a: _Answer, choices: list[dict[str, Any]], usage: Any = None, with_usage: bool = False
    ) -> dict[str, Any]:
        created = int(time.time())  # per chunk: time.Now() in toChunk
        if a.completion:
            obj: dict[str, Any] = {
                "id": a.id,
                "object": a.object,
                "created": created,
                "choices": choices,
                "model": a.model,
                "system_fingerprint": "fp_ollama",
            }
            if a.include_usage:  # every /v1/completions chunk carries usage (zeros until the end)
                obj["usage"] = (
                    usage
                    if with_usage
                    else {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
                )
            return obj
        obj = {
            "id": a.id,
            "object": a.object,
            "created": created,
            "model": a.model,
            "system_fingerprint": "fp_ollama",
            "choices": choices,
        }
        if with_usage:
            obj["usage"] = usage
        return obj

    def priming(self) -> dict[str, Any] | None:
        return None

    def delta(self, fields: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "assistant", "content": fields.get("content", "")}
        if self.reasoning_field in fields:
            out[self.reasoning_field] = fields[self.reasoning_field]
        if "tool_calls" in fields:
            out["tool_calls"] = fields["tool_calls"]
        return out

    def final_delta(self) -> dict[str, Any]:
        return {"role": "assistant", "content": ""}

    def chat_choice(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "finish_reason": finish}

    def text_choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "finish_reason": finish}

    def usage(self, a: _Answer) -> dict[str, Any]:
        return {
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens,
        }

    def usage_on_every_chunk(self, a: _Answer) -> bool:
        return False

    def whole_chat(self, a: _Answer, message: dict[str, Any], finish: str) -> dict[str, Any]:
        return {
            "id": a.id,
            "object": "chat.completion",
            "created": a.created,
            "model": a.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": self.usage(a),
        }

    def message(self, content: str | None, reasoning: str, calls: list[dict[str, Any]]) -> Any:
        msg: dict[str, Any] = {"role": "assistant", "content": content or ""}
        if reasoning:
            msg["reasoning"] = reasoning
        if calls:
            msg["tool_calls"] = calls
        return msg

    def whole_text(self, a: _Answer, text: str, finish: str) -> dict[str, Any]:
        return {
            "id": a.id,
            "object": "text_completion",
            "created": a.created,
            "model": a.model,
            "system_fingerprint": "fp_ollama",
            "choices": [self.text_choice(text, finish)],
            "usage": self.usage(a),
        }

    def model_entry(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.fake.created, "owned_by": "library"}

    def embeddings(self, model: str, vectors: list[Any], tokens: int) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def error(
        self,
        status: int,
        message: str,
        kind: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> tuple[int, bytes, str]:
        """An error from a native handler (re-encoded by the middleware's writer)."""
        kind = kind or {400: "invalid_request_error", 404: "not_found_error"}.get(
            status, "api_error"
        )
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return status, _go_json(body) + b"\n", _JSON

    def early(self, status: int, message: str) -> tuple[int, bytes, str]:
        """An error from the middleware itself (gin's c.JSON: charset, no newline)."""
        kind = "invalid_request_error" if status == 400 else "api_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return status, _go_json(body), _JSON_UTF8

    def not_found(self, path: str) -> tuple[int, bytes, str]:
        return 404, b"404 page not found", "text/plain"

    def bad_method(self, method: str, path: str) -> tuple[int, bytes, str]:
        return 405, b"405 method not allowed", "text/plain"

    def bad_json(self, raw: bytes) -> tuple[int, bytes, str]:
        if not raw.strip():
            return self.early(400, "EOF")
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            text = raw.decode("utf-8", "replace")
            if exc.pos >= len(text.rstrip()):
                return self.early(400, "unexpected EOF")
            return self.early(
                400, f"invalid character {text[exc.pos]!r} looking for beginning of value"
            )
        raise AssertionError("bad_json called on valid JSON")

    def not_an_object(self, path: str, value: Any) -> tuple[int, bytes, str]:
        struct_name = _GO_STRUCTS[path]
        return self.early(
            400, f"json: cannot unmarshal {_kind(value)} into Go value of type openai.{struct_name}"
        )

    def bad_type(self, path: str, name: str, value: Any, want: str) -> tuple[int, bytes, str]:
        go = _GO_TYPES[name]
        what = f"number {value}" if _is_number(value) and go == "int" else _kind(value)
        return self.early(
            400,
            f"json: cannot unmarshal {what} into Go struct field "
            f"{_GO_STRUCTS[path]}.{name} of type {go}",
        )

    def missing(self, path: str, body: dict[str, Any], name: str) -> tuple[int, bytes, str] | None:
        if name == "model":
            return self.error(400, "model is required")
        if name == "input":
            return self.early(400, "invalid input")
        return None  # /v1/completions without a prompt loads the model; not modelled

    def empty_messages(self) -> tuple[int, bytes, str] | None:
        return self.early(400, "[] is too short - 'messages'")

    def unknown_model(self, path: str, model: str) -> tuple[int, bytes, str] | None:
        if path == "/v1/embeddings":
            return self.error(404, f'model "{model}" not found, try pulling it first')
        return self.error(404, f"model '{model}' not found")

    def no_tools(self, model: str) -> tuple[int, bytes, str] | None:
        name = model if "/" in model else f"registry.ollama.ai/library/{model}"
        return self.error(400, f"{name} does not support tools")

    def overflow(self, a: _Answer, window: int, stream: bool) -> tuple[int, bytes, str] | None:
        a.prompt_tokens = window  # the prompt is truncated to fit, silently
        return None

    def model_route(self, name: str) -> tuple[int, bytes, str]:
        if name in self.fake.models:
            return (200, *self.body_json(self.model_entry(name)))
        return self.error(404, f"model '{name}' not found")

    def health(self) -> tuple[int, bytes, str] | None:
        return None


class _LlamaCppPythonWire(_Wire):
    """llama-cpp-python 0.3.36's server (FastAPI, uvicorn, sse-starlette)."""

    name: Dialect = "llama-cpp-python"
    sse_type = _SSE_UTF8
    honours_include_usage = False
    tool_call_style: ToolCallStyle = "repeated"

    def event_json(self, obj: Any) -> bytes:
        return _py_json(obj)

    def stream_headers(self) -> list[tuple[str, str]]:
        return [
            ("server", "uvicorn"),
            ("cache-control", "no-store"),
            ("x-accel-buffering", "no"),
            ("content-type", _SSE_UTF8),
            ("openai-processing-ms", "1"),
            ("x-request-id", uuid.uuid4().hex),
            ("vary", "Origin"),
        ]

    def json_headers(self) -> list[tuple[str, str]]:
        return [
            ("server", "uvicorn"),
            ("openai-processing-ms", "1"),
            ("x-request-id", uuid.uuid4().hex),
            ("vary", "Origin"),
        ]

    def new_id(self, completion: bool) -> str:
        return ("cmpl-" if completion else "chatcmpl-") + str(uuid.uuid4())

    def chunk(
        self, a: _Answer, choices: list[dict[str, Any]], usage: Any = None, with_usage: bool = False
    ) -> dict[str, Any]:
        if a.completion:
            return {
                "id": a.id,
                "object": a.object,
                "created": a.created,
                "model": a.model,
                "choices": choices,
            }
        return {
            "id": a.id,
            "model": a.model,
            "created": a.created,
            "object": a.object,
            "choices": choices,
        }

    def priming(self) -> dict[str, Any] | None:
        return {"role": "assistant"}

    def text_choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def usage(self, a: _Answer) -> dict[str, Any]:
        return {
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens,
        }

    def usage_on_every_chunk(self, a: _Answer) -> bool:
        return False

    def whole_chat(self, a: _Answer, message: dict[str, Any], finish: str) -> dict[str, Any]:
        return {
            "id": a.id,
            "object": "chat.completion",
            "created": a.created,
            "model": a.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": self.usage(a),
        }

    def message(self, content: str | None, reasoning: str, calls: list[dict[str, Any]]) -> Any:
        if calls:
            first = calls[0]["function"]
            return {
                "content": None,
                "tool_calls": calls,
                "role": "assistant",
                "function_call": {"name": first["name"], "arguments": first["arguments"]},
            }
        msg: dict[str, Any] = {"content": content, "role": "assistant"}
        if reasoning:
            msg["reasoning_content"] = reasoning
        return msg

    def whole_text(self, a: _Answer, text: str, finish: str) -> dict[str, Any]:
        return {
            "id": a.id,
            "object": "text_completion",
            "created": a.created,
            "model": a.model,
            "choices": [self.text_choice(text, finish)],
            "usage": self.usage(a),
        }

    def model_entry(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "owned_by": "me", "permissions": []}

    def embeddings(self, model: str, vectors: list[Any], tokens: int) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def embedding_norm(self) -> float:
        return _LLAMA_EMBED_NORM

    def detail(self, status: int, detail: str) -> tuple[int, bytes, str]:
        return status, _compact({"detail": detail}), _JSON

    def validation(self, path: str, errors: list[dict[str, Any]]) -> tuple[int, bytes, str]:
        """Pydantic's error, which llama-cpp-python turns into a 500 (message abridged)."""
        n = len(errors)
        lines = "\n".join(f"  {e!r}" for e in errors)
        where = _LLAMA_HANDLERS[path]
        message = (
            f"{n} validation error{'s' if n > 1 else ''}:\n{lines}\n\n"
            f'  File "llama_cpp/server/app.py", line {where[1]}, in {where[0]}\n'
            f"    POST {path}"
        )
        return super().error(500, message, "internal_server_error")

    def not_found(self, path: str) -> tuple[int, bytes, str]:
        return self.detail(404, "Not Found")

    def bad_method(self, method: str, path: str) -> tuple[int, bytes, str]:
        return self.detail(405, "Method Not Allowed")

    def bad_json(self, raw: bytes) -> tuple[int, bytes, str]:
        return 500, b"Internal Server Error", "text/plain; charset=utf-8"

    def not_an_object(self, path: str, value: Any) -> tuple[int, bytes, str]:
        return self.validation(
            path,
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "input": value,
                }
            ],
        )

    def bad_type(self, path: str, name: str, value: Any, want: str) -> tuple[int, bytes, str]:
        kind, msg = _PYDANTIC[want]
        return self.validation(
            path, [{"type": kind, "loc": ("body", name), "msg": msg, "input": value}]
        )

    def missing(self, path: str, body: dict[str, Any], name: str) -> tuple[int, bytes, str] | None:
        if name in ("input", "prompt") and path != "/v1/completions":
            return self.validation(
                path,
                [
                    {
                        "type": "missing",
                        "loc": ("body", name),
                        "msg": "Field required",
                        "input": body,
                    }
                ],
            )
        return None  # model and messages may be left out: it answers anyway

    def empty_messages(self) -> tuple[int, bytes, str] | None:
        return None

    def unknown_model(self, path: str, model: str) -> tuple[int, bytes, str] | None:
        return None  # serves its one model under any name

    def response_format(self, value: Any) -> tuple[int, bytes, str] | None:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind in ("text", "json_object"):
            return None
        return self.validation(
            "/v1/chat/completions",
            [
                {
                    "type": "literal_error",
                    "loc": ("body", "response_format", "type"),
                    "msg": "Input should be 'text' or 'json_object'",
                    "input": kind,
                    "ctx": {"expected": "'text' or 'json_object'"},
                }
            ],
        )

    def overflow(self, a: _Answer, window: int, stream: bool) -> tuple[int, bytes, str] | None:
        if stream:
            return None  # handled by the stream: 200, then no event at all
        asked = a.max_tokens
        if a.completion:
            message = (
                f"This model's maximum context length is {window} tokens, however you "
                f"requested {(asked or 0) + a.prompt_tokens} tokens ({a.prompt_tokens} in "
                f"your prompt; {asked} for the completion). Please reduce your prompt; "
                "or completion length."
            )
        else:
            message = (
                f"This model's maximum context length is {window} tokens. However, you "
                f"requested {(asked or 0) + a.prompt_tokens} tokens ({a.prompt_tokens} in "
                f"the messages, {asked} in the completion). Please reduce the length of "
                "the messages or completion."
            )
        return super().error(
            400, message, "invalid_request_error", "messages", "context_length_exceeded"
        )

    def model_route(self, name: str) -> tuple[int, bytes, str]:
        return self.detail(404, "Not Found")

    def health(self) -> tuple[int, bytes, str] | None:
        return None


_WIRES: dict[str, type[_Wire]] = {
    "openai": _Wire,
    "ollama": _OllamaWire,
    "llama-cpp-python": _LlamaCppPythonWire,
}
_GO_STRUCTS = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/v1/embeddings": "EmbedRequest",
}
_GO_TYPES = {
    "model": "string",
    "messages": "[]openai.Message",
    "stream": "bool",
    "max_tokens": "int",
    "seed": "int",
    "temperature": "float64",
    "top_p": "float64",
    "frequency_penalty": "float64",
    "presence_penalty": "float64",
    "prompt": "string",
    "stream_options": "openai.StreamOptions",
    "tools": "[]api.Tool",
    "dimensions": "int",
    "encoding_format": "string",
}
_LLAMA_HANDLERS = {
    "/v1/chat/completions": ("create_chat_completion", 376),
    "/v1/completions": ("create_completion", 288),
    "/v1/embeddings": ("create_embedding", 360),
}
_PYDANTIC = {
    "string": ("string_type", "Input should be a valid string"),
    "number": (
        "float_parsing",
        "Input should be a valid number, unable to parse string as a number",
    ),
    "integer": (
        "int_parsing",
        "Input should be a valid integer, unable to parse string as an integer",
    ),
    "boolean": ("bool_parsing", "Input should be a valid boolean, unable to interpret input"),
    "array": ("list_type", "Input should be a valid list"),
    "object": ("dict_type", "Input should be a valid dictionary"),
}

#: Request fields checked for their JSON type, per path (the rest are accepted as they are).
_FIELDS: dict[str, dict[str, str]] = {
    "/v1/chat/completions": {
        "model": "string",
        "messages": "array",
        "stream": "boolean",
        "max_tokens": "integer",
        "max_completion_tokens": "integer",
        "seed": "integer",
        "temperature": "number",
        "top_p": "number",
        "frequency_penalty": "number",
        "presence_penalty": "number",
        "stream_options": "object",
        "tools": "array",
        "n": "integer",
    },
    "/v1/completions": {
        "model": "string",
        "prompt": "string",
        "stream": "boolean",
        "max_tokens": "integer",
        "seed": "integer",
        "temperature": "number",
        "top_p": "number",
        "stream_options": "object",
    },
    "/v1/embeddings": {"model": "string", "dimensions": "integer", "encoding_format": "string"},
}
#: Fields the Go structs of Ollama's /v1 do not have: ignored there, so not type-checked.
_OLLAMA_UNKNOWN = frozenset({"max_completion_tokens", "n"})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if _is_number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


def _type_ok(value: Any, want: str) -> bool:
    if value is None:
        return True
    return {
        "string": isinstance(value, str),
        "number": _is_number(value),
        "integer": _is_number(value) and float(value).is_integer(),
        "boolean": isinstance(value, bool),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }[want]


def _lax_number(value: Any, want: str) -> tuple[float | int] | None:
    """A numeric string as pydantic (lax mode) reads it for a number or integer field."""
    if not isinstance(value, str) or want not in ("number", "integer"):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if want == "integer":
        return (int(number),) if number.is_integer() else None
    return (number,)


def _words(value: Any) -> int:
    """A stand-in token count: whitespace-separated words in every string in value."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return sum(_words(v) for v in value.values())
    return 0


def _float32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


# --------------------------------------------------------------------------------------------
# One answer: the events of a stream, or the whole object


@dataclass
class _Answer:
    id: str
    object: str
    created: int
    model: str
    completion: bool
    include_usage: bool
    max_tokens: int | None
    prompt_tokens: int
    completion_tokens: int = 0
    reasoning_tokens: int = 0


class _Plan:
    """What one answer says, from the fake's settings and the request."""

    def __init__(self, fake: FakeOpenAI, wire: _Wire, a: _Answer, want_tools: bool) -> None:
        self.wire, self.a = wire, a
        tokens = list(fake.tokens)
        reasoning = [] if a.completion else list(fake.reasoning)
        limit = a.max_tokens
        cut = False
        if limit is not None and limit >= 0 and limit < len(reasoning) + len(tokens):
            cut = True
            reasoning = reasoning[:limit]
            tokens = tokens[: max(0, limit - len(reasoning))]
        self.reasoning, self.tokens = reasoning, tokens
        self.calls = [] if a.completion or cut else list(fake.tool_calls)
        if self.calls and not want_tools and fake.tool_calls_need_tools:
            self.calls = []
        a.reasoning_tokens = len(reasoning)
        a.completion_tokens = len(reasoning) + len(tokens) + 3 * len(self.calls)
        if fake.finish_reason is not None:
            self.finish = fake.finish_reason
        elif cut:
            self.finish = "length"
        elif self.calls:
            self.finish = "tool_calls"
        else:
            self.finish = "stop"
        self.style: ToolCallStyle = fake.tool_call_style or wire.tool_call_style
        self.reasoning_field = fake.reasoning_field or wire.reasoning_field

    def _call_id(self, i: int) -> str:
        call = self.calls[i]
        return call.id or f"call_{i}_{self.a.id[-8:]}"

    def _whole_call(self, i: int, index: bool = True, as_object: bool = False) -> dict[str, Any]:
        call = self.calls[i]
        args: Any = orjson.loads(call.arguments) if as_object else call.arguments
        out: dict[str, Any] = {"id": self._call_id(i)}
        if index:
            out["index"] = i
        out |= {"type": "function", "function": {"name": call.name, "arguments": args}}
        return out

    def _tool_deltas(self) -> Iterator[list[dict[str, Any]]]:
        """The ``delta.tool_calls`` lists, one per chunk, in the chosen style."""
        if not self.calls:
            return
        if self.style == "whole":
            yield [self._whole_call(i) for i in range(len(self.calls))]
            return
        if self.style in ("no_index", "object_args"):
            for i in range(len(self.calls)):
                yield [
                    self._whole_call(
                        i, index=self.style != "no_index", as_object=self.style == "object_args"
                    )
                ]
            return
        for i, call in enumerate(self.calls):
            index = 0 if self.style == "index0" else i
            yield [
                {
                    "index": index,
                    "id": self._call_id(i),
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            ]
            text = call.arguments
            step = max(1, math.ceil(len(text) / 3))
            for start in range(0, len(text), step):
                piece = text[start : start + step]
                if self.style == "repeated":
                    yield [
                        {
                            "index": index,
                            "id": self._call_id(i),
                            "type": "function",
                            "function": {"name": call.name, "arguments": piece},
                        }
                    ]
                else:
                    yield [{"index": index, "function": {"arguments": piece}}]

    def events(self) -> list[dict[str, Any]]:
        """Every data event of the stream, [DONE] excluded (the usage chunk last, if any)."""
        wire, a = self.wire, self.a
        every = wire.usage_on_every_chunk(a)
        out: list[dict[str, Any]] = []

        def chat(delta: dict[str, Any], finish: str | None = None) -> None:
            out.append(wire.chunk(a, [wire.chat_choice(delta, finish)], None, every))

        if a.completion:
            for text in self.tokens:
                out.append(wire.chunk(a, [wire.text_choice(text, None)], None, every))
            out.append(wire.chunk(a, [wire.text_choice("", self.finish)], None, every))
        else:
            if (priming := wire.priming()) is not None:
                chat(priming)
            for piece in self.reasoning:
                chat(wire.delta({self.reasoning_field: piece}))
            for text in self.tokens:
                chat(wire.delta({"content": text}))
            for calls in self._tool_deltas():
                chat(wire.delta({"tool_calls": calls}))
            chat(wire.final_delta(), self.finish)
        if a.include_usage and wire.honours_include_usage:
            out.append(wire.chunk(a, [], wire.usage(a), True))
        return out

    def whole(self) -> dict[str, Any]:
        wire, a = self.wire, self.a
        text = "".join(self.tokens)
        if a.completion:
            return wire.whole_text(a, text, self.finish)
        calls = [self._whole_call(i, index=False) for i in range(len(self.calls))]
        message = wire.message(text if text or not calls else None, "".join(self.reasoning), calls)
        return wire.whole_chat(a, message, self.finish)


# --------------------------------------------------------------------------------------------
# SSE framing


def _sse(payload: bytes, fault: Fault, event: str | None = None) -> bytes:
    """One event as its bytes on the wire (``data:`` line(s), then a blank line)."""
    nl = fault.newline.encode()
    lines = [b"event: " + event.encode()] if event else []
    if fault.multiline_data and payload.startswith(b"{"):
        pretty = orjson.dumps(orjson.loads(payload), option=orjson.OPT_INDENT_2)
        lines += [b"data: " + line for line in pretty.split(b"\n")]
    else:
        lines.append(b"data: " + payload)
    return nl.join(lines) + nl + nl


class _Writer:
    """Writes one SSE response: chunked, optionally split and slowed, headers early or late."""

    def __init__(self, conn: _Conn, head: bytes, fault: Fault, early: bool) -> None:
        self.conn, self.fault = conn, fault
        self._head = head
        self.early = early
        self._offset = 0

    async def start(self) -> None:
        if self.early:
            await self.flush_head()

    async def flush_head(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            await self.conn.send(head)

    async def write(self, data: bytes) -> None:
        """One write, or with ``split_every`` pieces of that many bytes of the whole body, so
        that the cuts fall at a different place in every event."""
        step = self.fault.split_every
        if not step:
            await self._chunk(data)
            return
        while data:
            take = step - self._offset % step
            piece, data = data[:take], data[take:]
            self._offset += len(piece)
            await self._chunk(piece)
            if data and await self.conn.pause(self.fault.split_delay):
                raise ConnectionError("client went away")

    async def _chunk(self, data: bytes) -> None:
        if not data:  # an empty chunk would end the body
            return
        head, self._head = self._head, b""
        await self.conn.send(head + b"%x\r\n%s\r\n" % (len(data), data))

    async def end(self) -> None:
        head, self._head = self._head, b""
        await self.conn.send(head + b"0\r\n\r\n")


# --------------------------------------------------------------------------------------------
# The server


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        *,
        dialect: Dialect = "openai",
        models: Sequence[str] = ("tiny",),
        tokens: Sequence[str] | None = None,
        token_delay: float = 0.0,
        embed_dims: int = 8,
    ) -> None:
        if dialect not in _WIRES:
            raise ValueError(f"unknown dialect {dialect!r}: one of {sorted(_WIRES)}")
        self.dialect: Dialect = dialect
        self._wire = _WIRES[dialect](self)
        self.models: list[str] = list(models)
        self.tokens: list[str] = list(DEFAULT_TOKENS if tokens is None else tokens)
        self.token_delay = token_delay
        self.embed_dims = embed_dims
        #: Reasoning pieces streamed before the content (chat only).
        self.reasoning: list[str] = []
        #: Delta field for reasoning; None: the dialect's (reasoning_content; Ollama: reasoning).
        self.reasoning_field: str | None = None
        #: Tool calls made after the content (chat only), and how their deltas are cut.
        self.tool_calls: list[ToolCall] = []
        self.tool_call_style: ToolCallStyle | None = None
        #: Make tool calls only when the request has ``tools`` (as a model would).
        self.tool_calls_need_tools = True
        #: None: "length" when max_tokens cut the answer, "tool_calls" with tool calls, else
        #: "stop". Set it to force one ("content_filter", or "stop" despite tool calls).
        self.finish_reason: str | None = None
        #: Whether ``tools`` are accepted (the "ollama" dialect answers 400 when not).
        self.tools_supported = True
        #: Context size in (word-counted) tokens; None: unlimited.
        self.context_window: int | None = None
        #: ``created`` of /v1/models entries.
        self.created = 1_700_000_000
        self.requests: list[Request] = []
        self.streams: list[StreamRecord] = []
        self.active_streams = 0
        self.connections_accepted = 0
        self.errors: list[BaseException] = []
        self.port = 0
        self.url = ""
        self._ids = itertools.count(1)
        self._fault: Fault | None = None
        self._fault_left: int | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stream_added = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FakeOpenAI already started")
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Close the listener and every connection; raise if a handler failed."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for _ in range(3):
            await asyncio.sleep(0)
        while self._tasks:
            for conn in list(self._conns):
                conn.abort()
            _, pending = await asyncio.wait(list(self._tasks), timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        if self.errors:
            raise RuntimeError(f"FakeOpenAI handler failed: {self.errors[0]!r}") from self.errors[0]

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- faults and observation ---------------------------------------------------------------

    @property
    def fault(self) -> Fault | None:
        return self._fault

    @fault.setter
    def fault(self, fault: Fault | None) -> None:
        self._fault = fault
        self._fault_left = None if fault is None else fault.times

    def set_fault(self, fault: Fault | None) -> None:
        self.fault = fault

    def _take_fault(self, path: str, generating: bool) -> Fault:
        fault = self._fault
        if fault is None or not fault._matches(path, generating):
            return _NO_FAULT
        if self._fault_left is not None:
            self._fault_left -= 1
            if self._fault_left <= 0:
                self._fault = None
            if self._fault_left < 0:
                return _NO_FAULT
        return fault

    async def wait_for_disconnect(self, index: int = -1, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        """Wait until ``streams[index]`` (waiting for it to exist) saw the client go away."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    record = self.streams[index]
                    break
                except IndexError:
                    self._stream_added.clear()
                    await self._stream_added.wait()
            await record.disconnected.wait()
        assert record.disconnected_at is not None
        return record.disconnected_at

    # -- connections --------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        self._tasks.add(task)
        self.connections_accepted += 1
        try:
            while self._server is not None:
                try:
                    parsed = await conn.read_request()
                except _BadRequest:
                    await conn.respond(400, b"400 Bad Request", "text/plain", keep=False)
                    return
                if parsed is None:
                    return
                request, keep = parsed
                self.requests.append(request)
                if not await self._dispatch(conn, request, keep):
                    return
        except (OSError, ConnectionError):
            pass
        except Exception as exc:  # a bug in the fake: surfaced by stop()
            self.errors.append(exc)
        finally:
            await conn.close()
            self._conns.discard(conn)
            self._tasks.discard(task)

    async def _send(
        self,
        conn: _Conn,
        reply: tuple[int, bytes, str],
        keep: bool,
        extra: Sequence[tuple[str, str]] = (),
    ) -> bool:
        status, body, content_type = reply
        headers = [*extra, *self._wire.json_headers()] if status == 200 else [*extra]
        chunked = self._wire.whole_chunked(body)
        await conn.respond(status, body, content_type, keep, chunked=chunked, extra=headers)
        return keep

    async def _dispatch(self, conn: _Conn, req: Request, keep: bool) -> bool:
        wire = self._wire
        path = req.path
        routes = {
            "/v1/chat/completions": "POST",
            "/v1/completions": "POST",
            "/v1/embeddings": "POST",
            "/v1/models": "GET",
        }
        model_path = path.startswith("/v1/models/") and len(path) > len("/v1/models/")
        health = path == "/health" and wire.health() is not None
        method = "GET" if model_path or health else routes.get(path)
        if method is None:
            return await self._send(conn, wire.not_found(path), keep)
        if req.method != method and not (method == "GET" and req.method == "HEAD"):
            return await self._send(
                conn, wire.bad_method(req.method, path), keep, [("Allow", method)]
            )
        generating = path in ("/v1/chat/completions", "/v1/completions")
        fault = self._take_fault(path, generating)
        if fault.status is not None:
            if fault.delay_first and await conn.pause(fault.delay_first):
                return False
            error_body = (
                fault.error_body
                if fault.error_body is not None
                else orjson.dumps(_fault_error(fault))
            )
            await conn.respond(
                fault.status,
                error_body,
                fault.content_type,
                keep,
                chunked=False,
                extra=fault.headers,
            )
            return keep
        if fault.hang:
            await conn.eof.wait()
            return False
        if health:
            reply = wire.health()
            assert reply is not None
            return await self._send(conn, reply, keep)
        if path == "/v1/models":
            return await self._send(conn, (200, *wire.body_json(wire.models())), keep)
        if model_path:
            return await self._send(conn, wire.model_route(path[len("/v1/models/") :]), keep)
        body, error = self._decode(req)
        if error is not None:
            return await self._send(conn, error, keep)
        if path == "/v1/embeddings":
            return await self._embeddings(conn, body, keep)
        return await self._generate(conn, req, body, fault, keep)

    def _decode(self, req: Request) -> tuple[dict[str, Any], tuple[int, bytes, str] | None]:
        """The JSON body, or the dialect's error for it, checked in that server's order."""
        wire, path = self._wire, req.path
        try:
            body = orjson.loads(req.raw) if req.raw.strip() else None
        except orjson.JSONDecodeError:
            return {}, wire.bad_json(req.raw)
        if body is None and not req.raw.strip():
            return {}, wire.bad_json(req.raw)
        if wire.name == "llama-cpp-python" and "json" not in req.headers.get(
            "content-type", ""
        ):  # FastAPI reads the body as bytes unless the request says it is JSON
            return {}, wire.not_an_object(path, req.raw)
        if not isinstance(body, dict):
            return {}, wire.not_an_object(path, body)
        for name, want in _FIELDS[path].items():
            if wire.name == "ollama" and name in _OLLAMA_UNKNOWN:
                continue
            if wire.name == "llama-cpp-python" and (lax := _lax_number(body.get(name), want)):
                body[name] = lax[0]  # pydantic's lax mode: "3" is 3
                continue
            if not _type_ok(body.get(name), want):
                return {}, wire.bad_type(path, name, body[name], want)
        return body, None

    def _check(self, path: str, body: dict[str, Any]) -> tuple[int, bytes, str] | None:
        wire = self._wire
        model = body.get("model") or ""
        if path == "/v1/chat/completions" and not body.get("messages"):
            if wire.name == "openai" and "messages" not in body:
                return wire.missing(path, body, "messages")
            if (error := wire.empty_messages()) is not None:
                return error
        if not model and (error := wire.missing(path, body, "model")) is not None:
            return error
        if model and model not in self.models:
            if (error := wire.unknown_model(path, model)) is not None:
                return error
        if path == "/v1/chat/completions":
            if body.get("tools") and not self.tools_supported:
                if (error := wire.no_tools(model)) is not None:
                    return error
            if body.get("response_format") is not None:
                if (error := wire.response_format(body["response_format"])) is not None:
                    return error
        return None

    async def _embeddings(self, conn: _Conn, body: dict[str, Any], keep: bool) -> bool:
        wire = self._wire
        if (error := self._check("/v1/embeddings", body)) is not None:
            return await self._send(conn, error, keep)
        raw = body.get("input")
        if raw is None or raw == []:
            error = wire.missing("/v1/embeddings", body, "input")
            assert error is not None
            return await self._send(conn, error, keep)
        inputs = [raw] if isinstance(raw, str) else [str(v) for v in raw]
        dims = body.get("dimensions") or self.embed_dims
        scale = wire.embedding_norm()
        vectors: list[Any] = []
        for text in inputs:
            vector = [_float32(v * scale) for v in _embedding(text, int(dims))]
            if body.get("encoding_format") == "base64" and wire.name != "llama-cpp-python":
                vectors.append(base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode())
            else:
                vectors.append(vector)
        tokens = max(1, _words(inputs))
        reply = wire.embeddings(str(body.get("model") or self.models[0]), vectors, tokens)
        return await self._send(conn, (200, *wire.body_json(reply)), keep)

    async def _generate(
        self, conn: _Conn, req: Request, body: dict[str, Any], fault: Fault, keep: bool
    ) -> bool:
        wire, path = self._wire, req.path
        if (error := self._check(path, body)) is not None:
            return await self._send(conn, error, keep)
        completion = path == "/v1/completions"
        limit = body.get("max_tokens")
        if limit is None and wire.name == "openai":
            limit = body.get("max_completion_tokens")
        options = body.get("stream_options") or {}
        a = _Answer(
            id=wire.new_id(completion),
            object="text_completion" if completion else "chat.completion.chunk",
            created=int(time.time()),
            model=str(body.get("model") or self.models[0]),
            completion=completion,
            include_usage=bool(options.get("include_usage")),
            max_tokens=int(limit) if limit is not None else None,
            prompt_tokens=_words(body.get("prompt" if completion else "messages")) + 1,
        )
        stream = body.get("stream") is True
        overflow = self.context_window is not None and (
            a.prompt_tokens + max(a.max_tokens or 0, 0) > self.context_window
        )
        if overflow:
            assert self.context_window is not None
            if (error := wire.overflow(a, self.context_window, stream)) is not None:
                return await self._send(conn, error, keep)
        plan = _Plan(self, wire, a, want_tools=bool(body.get("tools")))
        record = StreamRecord(
            path=path, model=a.model, stream=stream, started_at=asyncio.get_running_loop().time()
        )
        self.streams.append(record)
        self._stream_added.set()
        conn.record = record
        self.active_streams += 1
        try:
            if not stream:
                return await self._whole(conn, keep, fault, record, plan)
            empty = overflow and wire.name == "llama-cpp-python"
            return await self._stream(conn, keep, fault, record, plan, empty)
        except ConnectionError:
            record._gone(asyncio.get_running_loop().time())
            return False
        finally:
            conn.record = None
            record._end(False)
            self.active_streams -= 1

    async def _whole(
        self, conn: _Conn, keep: bool, fault: Fault, record: StreamRecord, plan: _Plan
    ) -> bool:
        if await conn.pause(fault.delay_first):
            return False
        pieces = len(plan.reasoning) + len(plan.tokens)
        for i in range(pieces):
            action = fault._action(i)
            if action == "drop":
                record._end(False)
                conn.abort()
                return False
            if action == "hang":
                await conn.eof.wait()
                return False
            if action == "error":
                record._end(False)
                return await self._send(conn, self._wire.error(500, fault.message), keep)
            if i and await conn.pause(self.token_delay):
                return False
            record.chunks_sent = i + 1
        record._end(True)
        return await self._send(conn, (200, *self._wire.body_json(plan.whole())), keep)

    async def _stream(
        self, conn: _Conn, keep: bool, fault: Fault, record: StreamRecord, plan: _Plan, empty: bool
    ) -> bool:
        wire = self._wire
        head = _head(200, [*wire.stream_headers(), ("Transfer-Encoding", "chunked")], keep)
        out = _Writer(conn, head, fault, wire.head_early)
        await out.start()
        if empty:  # llama-cpp-python on a context overflow: 200, then nothing
            record._end(False)
            await out.end()
            return keep
        events = plan.events()
        tail = 2 if plan.a.include_usage and wire.honours_include_usage else 1
        for i, event in enumerate(events):
            if await conn.pause(fault.delay_first if i == 0 else self.token_delay):
                return False
            action = fault._action(i)
            if action == "drop":
                record._end(False)
                await out.flush_head()
                conn.abort()
                return False
            if action == "hang":
                await out.flush_head()
                await conn.eof.wait()
                return False
            if action == "error":
                record._end(False)
                error = {
                    "error": {
                        "message": fault.message,
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
                name = "error" if fault.error_style == "event" else None
                await out.write(_sse(wire.event_json(error), fault, name))
                await out.end()
                return keep
            if action == "truncate":
                record._end(False)
                if fault.done_on_truncate:
                    await out.write(_sse(b"[DONE]", fault))
                await out.end()
                return keep
            data = b""
            if fault.comment_every and i % fault.comment_every == 0:
                data += fault.comment.encode() + fault.newline.encode() * 2
            data += _sse(wire.event_json(event), fault)
            record.chunks_sent = i + 1
            last = i == len(events) - 1
            if wire.tail_in_one_write and i == len(events) - tail:
                rest = b"".join(_sse(wire.event_json(e), fault) for e in events[i + 1 :])
                record.chunks_sent = len(events)
                record._end(True)
                done = b"" if fault.omit_done else _sse(b"[DONE]", fault)
                await out.write(data + rest + done)
                await out.end()
                return keep
            await out.write(data)
            if last:
                record._end(True)
        if not fault.omit_done:
            await out.write(_sse(b"[DONE]", fault))
        await out.end()
        return keep


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """Parse an SSE body into (event name, data) pairs, as the spec says: lines end in CRLF, LF or
    CR; comments are skipped; data lines join with "\\n"; a blank line ends an event. For tests."""
    text = raw.decode("utf-8")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                events.append((name, "\n".join(data)))
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value
    return events
