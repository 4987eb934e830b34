"""An Ollama-compatible HTTP/1.1 server on a loopback socket, for end-to-end tests.

Built on plain ``asyncio.start_server`` (no web framework) and run in the test's own event
loop, so that it can do what only a real socket shows:

* stream NDJSON like Ollama (chunked encoding, headers go out with the first chunk, one
  ``json + "\\n"`` line written and drained per chunk);
* inject transport faults (:class:`Fault`): error statuses, an ``{"error": ...}`` line mid-stream,
  an abrupt close, a clean end without ``done:true``, hangs, raw bodies, slow first tokens;
* observe client disconnects at the socket. Every connection has a reader task that keeps reading
  for the connection's whole life; when it sees EOF or a reset while a generation is running, the
  generation's :class:`StreamRecord` is marked disconnected at once and production stops. This is
  the observable "Ollama stopped generating" signal for cancellation tests, and it does not wait
  for the next write, however large ``token_delay`` is.

Validation, status codes and messages follow our notes on Ollama v0.20.0 (OLLAMA.md),
reconciled with the pinned real Ollama v0.24.0 (scripts/ollama-wire-notes.md); the real tier's
``tests/real/test_wire_parity.py`` sends the same requests to both and compares status, headers,
framing and JSON layout. Checks run in Ollama's order: body decoding (400) → ``top_logprobs``
(400) → model (404, or 400 when empty on chat) → raw conflicts (400) → unload → ``think`` (400)
→ capabilities: tools, insert (400) → option types (500) → the injected fault (it stands in for
scheduling) → load → ``format`` (500; on a streaming request with a bare ``application/json``,
chunked, as the real one) → generation. Like Go's net/http, whole JSON bodies over 2048 bytes
are sent chunked, smaller ones with a Content-Length.

Usage::

    async with FakeOllama(tokens=["Hi", " there"], token_delay=0.05) as fake:
        fake.set_fault(Fault(drop_after=1, times=1))
        ...  # point the code under test at fake.url
        await fake.wait_for_disconnect()
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import http
import ipaddress
import math
import re
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import orjson

__all__ = ["DEFAULT_TOKENS", "FakeOllama", "Fault", "Request", "StreamRecord"]

#: The pieces a generate/chat answer streams by default, one per chunk.
DEFAULT_TOKENS: tuple[str, ...] = (
    "The", " sky", " is", " blue", " because", " air",
    " scatters", " blue", " light", " the", " most", ".",
)  # fmt: skip

_NDJSON = "application/x-ndjson"
_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
#: gin's own 404/405 pages say text/plain with no charset (real v0.24.0).
_TEXT_BARE = "text/plain"
#: Errors raised inside Ollama's streaming goroutine before the first chunk (invalid format,
#: context overflow) go out with this Content-Type, no charset, chunked (real v0.24.0).
_JSON_BARE = "application/json"
_EMBED_DIMS = 8
#: Go's net/http buffers this much of a handler's output: a body that fits is sent with a
#: Content-Length, a larger one with Transfer-Encoding: chunked (real v0.24.0: the 576-float
#: /api/embed answer and long stream:false answers arrive chunked).
_GO_BUFFER = 2048
_THINK_VALUES = ("high", "medium", "low", "max")


# --------------------------------------------------------------------------------------------
# Public records


@dataclass
class Fault:
    """What the next matching request(s) should do instead of a normal answer.

    /api/generate and /api/chat match (and count towards ``times``) every fault; an
    empty-prompt load request honours only ``status``, ``hang``, ``delay_first`` and the
    ``*_after`` = 0 cases, and an unload request matches none (Ollama does not schedule it).
    /api/embed and /api/tags match only faults with ``status`` or ``hang``. ``paths`` (an
    addition to the agreed API) narrows matching to the listed paths. ``*_after`` counts NDJSON
    lines; with ``stream:false`` it counts the pieces produced before the single reply, and
    ``error_after`` then gives a 500 ``{"error": message}`` reply as Ollama does. When several
    are set, the first to trigger wins; at the same count the order is drop, error, truncate,
    hang. ``error_after=0`` gives a 200 stream whose only line is the error (Ollama itself would
    answer 500 when nothing was sent yet: use ``status=500`` for that).
    """

    status: int | None = None
    message: str = ""
    error_after: int | None = None
    drop_after: int | None = None
    truncate_after: int | None = None
    hang: bool = False
    hang_after: int | None = None
    raw_body: bytes | None = None
    #: With ``status``: the whole body of the error answer (sent as text/html, like a
    #: proxy's error page) instead of ``{"error": message}``.
    error_body: bytes | None = None
    delay_first: float = 0.0
    times: int | None = None
    paths: tuple[str, ...] | None = None

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


@dataclass
class Request:
    """One HTTP request as received (path without query; body decoded from chunked)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes
    #: When the request had arrived in full (time.monotonic()).
    at: float = field(default_factory=time.monotonic)


@dataclass
class StreamRecord:
    """One generate/chat request that went on to generate (not load/unload, not rejected).

    ``chunks_sent`` counts NDJSON lines written (for ``stream:false``: pieces produced);
    ``completed`` means the whole answer (done:true) went out. ``disconnected`` is set when the
    client closed the connection before the answer ended; ``stream`` is False for
    ``stream:false`` requests. Times are ``loop.time()`` values.
    """

    path: str
    model: str
    chunks_sent: int = 0
    completed: bool = False
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected_at: float | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    stream: bool = True

    def _gone(self, at: float) -> None:
        if self.ended_at is None and not self.disconnected.is_set():
            self.disconnected_at = at
            self.disconnected.set()

    def _end(self, completed: bool) -> None:
        if self.ended_at is None:
            self.completed = completed
            self.ended_at = asyncio.get_running_loop().time()


# --------------------------------------------------------------------------------------------
# Small helpers: JSON like Go, time, names, validation


def _json(obj: Any) -> bytes:
    """Serialize like Go's json.Marshal: compact, HTML characters and U+2028/9 escaped."""
    out = orjson.dumps(obj)
    for raw, escaped in (
        (b"<", b"\\u003c"),
        (b">", b"\\u003e"),
        (b"&", b"\\u0026"),
        ("\u2028".encode(), b"\\u2028"),
        ("\u2029".encode(), b"\\u2029"),
    ):
        out = out.replace(raw, escaped)
    return out


def _go_quote(value: str) -> str:
    return orjson.dumps(value).decode()


def _now() -> str:
    """RFC3339 UTC with nanoseconds, trailing zeros trimmed (Go's RFC3339Nano)."""
    secs, nanos = divmod(time.time_ns(), 1_000_000_000)
    frac = f"{nanos:09d}".rstrip("0")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{stamp}.{frac}Z" if frac else f"{stamp}Z"


def _normalize_model(name: str) -> str:
    name = name.strip().lower()
    if name.rfind(":") <= name.rfind("/"):
        name += ":latest"
    slashes = name.count("/")
    if slashes == 0:
        return "registry.ollama.ai/library/" + name
    if slashes == 1:
        return "registry.ollama.ai/" + name
    return name


def _token_id(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 49152


def _float32(value: float) -> float:
    """The float32 nearest to value, as the shortest decimal Go would print for it."""
    exact: float = struct.unpack("<f", struct.pack("<f", value))[0]
    for digits in range(1, 10):
        short = float(f"{exact:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", short))[0] == exact:
            return short
    return exact


def _embedding(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    while len(digest) < dims:  # longer vectors: keep hashing
        digest += hashlib.sha256(f"{len(digest)}:{text}".encode()).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:dims]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [_float32(v / norm) for v in raw]


def _host_allowed(host: str) -> bool:
    """Ollama's allowedHostsMiddleware for a loopback listener."""
    if not host:
        return True
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.lower()
    if host in ("localhost", socket.gethostname().lower()):
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                   "m": 60.0, "h": 3600.0}  # fmt: skip
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([^\d.]*)")


def _parse_go_duration(text: str) -> float:
    """Seconds for a Go duration string; raises ValueError with Go's message."""
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"time: invalid duration {_go_quote(text)}")
    total, pos = 0.0, 0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if match is None:
            raise ValueError(f"time: invalid duration {_go_quote(text)}")
        number, unit = match.groups()
        if not unit:
            raise ValueError(f"time: missing unit in duration {_go_quote(text)}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"time: unknown unit {_go_quote(unit)} in duration {_go_quote(text)}")
        total += float(number) * _DURATION_UNITS[unit]
        pos = match.end()
    return -total if text.startswith("-") else total


def _keep_alive_zero(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    return isinstance(value, str) and _parse_go_duration(value) == 0


# Request fields and their Go types, for Go-like decode errors.
_GENERATE_FIELDS = {
    "model": "string", "prompt": "string", "suffix": "string", "system": "string",
    "template": "string", "context": "[]int", "raw": "bool", "images": "[]string",
    "options": "map", "keep_alive": "keep", "stream": "bool", "think": "think",
    "truncate": "bool", "shift": "bool", "logprobs": "bool", "top_logprobs": "int",
}  # fmt: skip
_CHAT_FIELDS = {
    "model": "string", "messages": "[]message", "tools": "array", "options": "map",
    "keep_alive": "keep", "stream": "bool", "think": "think", "truncate": "bool",
    "shift": "bool", "logprobs": "bool", "top_logprobs": "int",
}  # fmt: skip
_MESSAGE_FIELDS = {
    "role": "string", "content": "string", "thinking": "string", "images": "[]string",
    "tool_calls": "array", "tool_name": "string", "tool_call_id": "string",
}  # fmt: skip
_EMBED_FIELDS = {
    "model": "string", "truncate": "bool", "dimensions": "int", "options": "map",
    "keep_alive": "keep",
}  # fmt: skip
_GO_TYPES = {"map": "map[string]interface {}", "array": "[]interface {}",
             "[]message": "[]api.Message", "[]string": "[]string", "[]int": "[]int"}  # fmt: skip

_INT_OPTIONS = frozenset({"num_keep", "seed", "num_predict", "top_k", "repeat_last_n",
                          "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread"})  # fmt: skip
_FLOAT_OPTIONS = frozenset({"top_p", "min_p", "typical_p", "temperature", "repeat_penalty",
                            "presence_penalty", "frequency_penalty"})  # fmt: skip


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _field_error(struct_name: str, path: str, kind: str, value: Any) -> str | None:
    def mismatch(what: str, go_type: str) -> str:
        where = f"Go struct field {struct_name}.{path}"
        return f"json: cannot unmarshal {what} into {where} of type {go_type}"

    if value is None or kind == "any":
        return None
    if kind == "keep":
        if _is_number(value):
            return None
        if isinstance(value, str):
            try:
                _parse_go_duration(value)
            except ValueError as exc:
                return str(exc)
            return None
        go_type = {"bool": "bool", "array": "[]interface {}"}.get(_json_kind(value))
        return f"Unsupported type: '{go_type or 'map[string]interface {}'}'"
    if kind == "think":
        if isinstance(value, bool) or value in _THINK_VALUES:
            return None
        shown = value if isinstance(value, str) else orjson.dumps(value).decode()
        return (
            f"invalid think value: {_go_quote(shown)} "
            '(must be "high", "medium", "low", "max", true, or false)'
        )
    if kind in ("string", "bool"):
        ok = isinstance(value, str) if kind == "string" else isinstance(value, bool)
        return None if ok else mismatch(_json_kind(value), kind)
    if kind == "int":
        if _is_number(value) and float(value).is_integer():
            return None
        what = f"number {value}" if _is_number(value) else _json_kind(value)
        return mismatch(what, "int")
    if kind == "map":
        return None if isinstance(value, dict) else mismatch(_json_kind(value), _GO_TYPES[kind])
    if not isinstance(value, list):
        return mismatch(_json_kind(value), _GO_TYPES[kind])
    for item in value:
        if kind == "[]int" and not (_is_number(item) and float(item).is_integer()):
            return mismatch(_json_kind(item), "int")
        if kind == "[]string" and not isinstance(item, str | None):
            return mismatch(_json_kind(item), "string")
        if kind == "[]message":
            if not isinstance(item, dict | None):
                return mismatch(_json_kind(item), "api.Message")
            for key, sub_kind in _MESSAGE_FIELDS.items():
                error = _field_error(struct_name, f"{path}.{key}", sub_kind, (item or {}).get(key))
                if error:
                    return error
    return None


def _decode(raw: bytes, struct_name: str, fields: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Decode a request body like gin's ShouldBindJSON: (body, "") or ({}, error text)."""
    if not raw.strip():
        return {}, "missing request body"
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        text = raw.decode("utf-8", "replace")
        if exc.pos >= len(text.rstrip()):
            return {}, "unexpected EOF"
        return {}, f"invalid character {text[exc.pos]!r} looking for beginning of value"
    if body is None:
        return {}, ""
    if not isinstance(body, dict):
        kind = _json_kind(body)
        return {}, f"json: cannot unmarshal {kind} into Go value of type api.{struct_name}"
    for name, kind in fields.items():
        error = _field_error(struct_name, name, kind, body.get(name))
        if error:
            return {}, error
    return body, ""


def _option_error(options: dict[str, Any] | None) -> str:
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key in _INT_OPTIONS and not _is_number(value):
            return f'option "{key}" must be of type integer'
        if key in _FLOAT_OPTIONS and not _is_number(value):
            return f'option "{key}" must be of type float32'
        if key == "use_mmap" and not isinstance(value, bool):
            return f'option "{key}" must be of type boolean'
        if key == "stop":
            if not isinstance(value, list):
                return f'option "{key}" must be of type array'
            if not all(isinstance(item, str) for item in value):
                return f'option "{key}" must be of an array of strings'
    return ""


def _format_error(value: Any) -> str:
    if value is None or value in ("", "json") or isinstance(value, dict):
        return ""
    raw = orjson.dumps(value).decode()
    return f'invalid format: {_go_quote(raw)}; expected "json" or a valid JSON Schema object'


# --------------------------------------------------------------------------------------------
# Answers: the JSON objects of one generate or chat reply


@dataclass
class _Piece:
    kind: str  # "thinking" | "content" | "tools"
    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None


class _Answer:
    """Plans one generate/chat answer and builds its chunks, final chunk and whole object."""

    def __init__(self, fake: FakeOllama, chat: bool, body: dict[str, Any], model: str) -> None:
        self.chat, self.model = chat, model
        self.started_ns = time.monotonic_ns()
        self.final_text = fake.final_text
        self.done_reason = fake.done_reason
        tokens = list(fake.tokens)
        limit = (body.get("options") or {}).get("num_predict")
        if (
            isinstance(limit, int | float)
            and not isinstance(limit, bool)
            and 0 <= limit < len(tokens)
        ):
            tokens, self.done_reason = tokens[: int(limit)], "length"
        thinking = [] if body.get("think") is False else list(fake.thinking)
        self.pieces = [_Piece("thinking", t) for t in thinking]
        self.pieces += [_Piece("content", t) for t in tokens]
        self.done_tool_calls: list[dict[str, Any]] | None = None
        if chat and fake.tool_calls:
            if fake.tool_calls_on_done:
                self.done_tool_calls = list(fake.tool_calls)
            else:
                self.pieces.append(_Piece("tools", tool_calls=list(fake.tool_calls)))
        self.want_tools = bool(body.get("tools"))
        self.raw = body.get("raw") is True
        if chat:
            messages = body.get("messages") or []
            words = [w for m in messages for w in ((m or {}).get("content") or "").split()]
        else:
            words = str(body.get("prompt") or "").split()
        self.prompt_ids = [_token_id(w) for w in words]

    @property
    def items(self) -> int:
        """Number of lines in a full stream: the pieces plus the done chunk."""
        return len(self.pieces) + 1

    def _eval_count(self, pieces: Sequence[_Piece]) -> int:
        return sum(1 for p in pieces if p.kind != "tools")

    def _metrics(self, eval_count: int) -> dict[str, int]:
        prompt_count = len(self.prompt_ids) + 1
        # Real Ollama samples the first token in the prompt step: eval_duration covers the
        # eval_count - 1 tokens after it, and is absent (omitempty) when only one was made.
        steps = max(eval_count - 1, 0)
        load, prompt_eval, evaluation = 1_500_000, 300_000 * prompt_count, 2_000_000 * steps
        elapsed = time.monotonic_ns() - self.started_ns
        metrics = {
            "total_duration": max(elapsed, load + prompt_eval + evaluation + 100_000),
            "load_duration": load,
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": prompt_eval,
            "eval_count": eval_count,
            "eval_duration": evaluation,
        }
        return {k: v for k, v in metrics.items() if v}  # Go omitempty

    def _message(self, content: str, thinking: str, tools: list[dict[str, Any]] | None) -> Any:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if tools:
            message["tool_calls"] = tools
        return message

    def _object(
        self, content: str, thinking: str, tools: list[dict[str, Any]] | None, done: bool
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            obj["message"] = self._message(content, thinking, tools)
        else:
            obj["response"] = content
            if thinking:
                obj["thinking"] = thinking
        obj["done"] = done
        return obj

    def chunk(self, index: int) -> dict[str, Any]:
        """Line ``index`` of the stream (the last one is the done chunk)."""
        if index == len(self.pieces):
            return self._done(self.pieces, self.final_text, "", self.done_tool_calls)
        piece = self.pieces[index]
        content = piece.text if piece.kind == "content" else ""
        thinking = piece.text if piece.kind == "thinking" else ""
        return self._object(content, thinking, piece.tool_calls, False)

    def _done(
        self, pieces: Sequence[_Piece], content: str, thinking: str,
        tools: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:  # fmt: skip
        obj = self._object(content, thinking, tools, True)
        obj["done_reason"] = self.done_reason
        if not self.chat and not self.raw:
            obj["context"] = self.prompt_ids + [
                _token_id(p.text) for p in pieces if p.kind == "content"
            ]
        obj.update(self._metrics(self._eval_count(pieces)))
        return obj

    def whole(self, produced: int, complete: bool) -> dict[str, Any]:
        """The ``stream:false`` reply after ``produced`` pieces (complete: done:true)."""
        pieces = self.pieces[:produced]
        content = "".join(p.text for p in pieces if p.kind == "content")
        thinking = "".join(p.text for p in pieces if p.kind == "thinking")
        tools: list[dict[str, Any]] | None = None
        if self.want_tools:
            tools = [c for p in pieces for c in p.tool_calls or []]
            if complete:
                tools += self.done_tool_calls or []
        if not complete:
            return self._object(content, thinking, tools, False)
        return self._done(pieces, content + self.final_text, thinking, tools)


# --------------------------------------------------------------------------------------------
# Connections


class _BadRequest(Exception):
    pass


class _Conn:
    """One client connection: a reader task that watches the socket for its whole life."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.eof = asyncio.Event()
        self.record: StreamRecord | None = None
        self.closed_by_server = False
        self._more = asyncio.Event()
        self._head = b""
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.buf += data
                self._more.set()
        except OSError:
            pass
        finally:
            self.eof.set()
            self._more.set()
            if self.record is not None and not self.closed_by_server:
                self.record._gone(asyncio.get_running_loop().time())

    async def _fill(self) -> bool:
        if self.eof.is_set():
            return False
        self._more.clear()
        await self._more.wait()
        return True

    async def read_until(self, sep: bytes, limit: int) -> bytes | None:
        start = 0
        while (end := self.buf.find(sep, start)) < 0:
            if len(self.buf) > limit:
                raise _BadRequest
            start = max(0, len(self.buf) - len(sep) + 1)
            if not await self._fill():
                return None
        out = bytes(self.buf[: end + len(sep)])
        del self.buf[: end + len(sep)]
        return out

    async def read_exact(self, size: int) -> bytes | None:
        while len(self.buf) < size:
            if not await self._fill():
                return None
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    async def _read_chunked(self) -> bytes | None:
        body = bytearray()
        while True:
            line = await self.read_until(b"\r\n", 4096)
            if line is None:
                return None
            try:
                size = int(line[:-2].split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest from None
            if size < 0:
                raise _BadRequest
            if size == 0:
                while (trailer := await self.read_until(b"\r\n", 65536)) != b"\r\n":
                    if trailer is None:
                        return None
                return bytes(body)
            data = await self.read_exact(size + 2)
            if data is None:
                return None
            if not data.endswith(b"\r\n"):
                raise _BadRequest
            body += data[:-2]

    async def read_request(self) -> tuple[Request, bool] | None:
        """The next request and whether the connection may be kept alive; None at EOF."""
        head = await self.read_until(b"\r\n\r\n", 1 << 20)
        if head is None:
            return None
        request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
            raise _BadRequest
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in header_lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise _BadRequest
            key, value = name.lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length", "0")
        if not chunked and not length.isdigit():
            raise _BadRequest
        if headers.get("expect", "").lower() == "100-continue":
            await self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        raw = await self._read_chunked() if chunked else await self.read_exact(int(length))
        if raw is None:
            return None
        try:
            body = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            body = None
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        path = target.split("?", 1)[0]
        return Request(method, path, headers, body, raw), keep

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def respond(
        self, status: int, body: bytes, content_type: str | None, keep: bool,
        head_only: bool = False, *, chunked: bool | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:  # fmt: skip
        """One whole response. Like Go's net/http, a body larger than its 2048-byte buffer
        goes out chunked unless ``chunked`` says otherwise."""
        headers = [*extra, *([("Content-Type", content_type)] if content_type else [])]
        if chunked is None:
            chunked = len(body) > _GO_BUFFER and not head_only
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
            payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        else:
            headers.append(("Content-Length", str(len(body))))
            payload = body
        await self.send(_head(status, headers, keep) + (b"" if head_only else payload))

    def begin_chunked(self, keep: bool) -> None:
        """Prepare NDJSON headers; they go out with the first chunk, as in Ollama."""
        self._head = _head(200, [("Content-Type", _NDJSON), ("Transfer-Encoding", "chunked")], keep)

    async def chunk(self, data: bytes, last: bool = False) -> None:
        out = self._head + (b"%x\r\n%s\r\n" % (len(data), data) if data else b"")
        self._head = b""
        await self.send(out + (b"0\r\n\r\n" if last else b""))

    async def pause(self, delay: float) -> bool:
        """Wait up to ``delay`` seconds; True as soon as the client has gone."""
        if delay > 0 and not self.eof.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.eof.wait()
        else:
            await asyncio.sleep(0)
        return self.eof.is_set()

    def abort(self) -> None:
        self.closed_by_server = True
        self.writer.transport.abort()

    async def close(self) -> None:
        self.pump.cancel()
        await asyncio.gather(self.pump, return_exceptions=True)
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _head(status: int, headers: Sequence[tuple[str, str]], keep: bool) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = f"status code {status}"
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    lines.append(f"Date: {formatdate(usegmt=True)}")
    if not keep:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_Handler = Callable[[_Conn, Request, bool], Awaitable[bool]]


# --------------------------------------------------------------------------------------------
# The server


class FakeOllama:
    """An Ollama v0.20 look-alike on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        *,
        models: Sequence[str] = ("tiny:latest",),
        tokens: Sequence[str] | None = None,
        token_delay: float = 0.0,
        version: str = "0.20.0",
        capabilities: Mapping[str, Iterable[str]] | None = None,
        embed_dims: int = _EMBED_DIMS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        #: Serve https:// with this (the URL says https then).
        self.ssl_context = ssl_context
        self.models: list[str] = list(models)
        #: Per model (any spelling Ollama accepts), what it can do: "thinking", "tools",
        #: "insert" (suffix). Models not listed can use tools and suffix, and think when their
        #: name contains "think". Real Ollama checks these after think values and before
        #: option types: e.g. smollm2:135m has only "completion" (see tests/real).
        self.capabilities: dict[str, frozenset[str]] = {
            _normalize_model(name): frozenset(caps) for name, caps in (capabilities or {}).items()
        }
        #: Length of /api/embed vectors (smollm2:135m: 576, which makes the answer chunked).
        self.embed_dims = embed_dims
        self.tokens: list[str] = list(DEFAULT_TOKENS if tokens is None else tokens)
        self.token_delay = token_delay
        self.version = version
        self.final_text = ""
        self.thinking: list[str] = []
        self.tool_calls: list[dict[str, Any]] | None = None
        self.tool_calls_on_done = False
        self.done_reason = "stop"
        self.check_host = True
        #: Models /api/ps lists as loaded, as named in /api/tags ("tiny:latest"); a
        #: generation loads its model, and an unload request (keep_alive 0) drops it.
        self.loaded: list[str] = []
        self.requests: list[Request] = []
        self.streams: list[StreamRecord] = []
        self.active_streams = 0
        self.max_active_streams = 0
        self.connections_accepted = 0
        self.errors: list[BaseException] = []
        self.port = 0
        self.url = ""
        self._fault: Fault | None = None
        self._fault_left: int | None = None
        self._server: asyncio.Server | None = None
        self._started = False
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stream_added = asyncio.Event()
        self._routes: dict[str, tuple[tuple[str, ...], _Handler]] = {
            "/": (("GET", "HEAD"), self._root),
            "/api/version": (("GET", "HEAD"), self._version),
            "/api/tags": (("GET", "HEAD"), self._tags),
            "/api/ps": (("GET", "HEAD"), self._ps),
            "/api/generate": (("POST",), self._generate),
            "/api/chat": (("POST",), self._chat),
            "/api/embed": (("POST",), self._embed),
        }

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        if self._started:
            raise RuntimeError("FakeOllama already started")
        await self._listen(0)
        self._started = True

    async def stop(self) -> None:
        """Close the listener and every open connection; raise if a handler failed."""
        await self._shutdown()
        self._started = False
        if self.errors:
            raise RuntimeError(f"FakeOllama handler failed: {self.errors[0]!r}") from self.errors[0]

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def down(self) -> bool:
        """True while the listener is closed (connections are refused)."""
        return self._server is None

    async def go_down(self) -> None:
        """Simulate Ollama dying: close the listener and abort every open connection."""
        if not self._started:
            raise RuntimeError("FakeOllama not started")
        await self._shutdown()

    async def come_up(self) -> None:
        """Listen again on the same port."""
        if not self._started:
            raise RuntimeError("FakeOllama not started")
        if self._server is None:
            await self._listen(self.port)

    async def _listen(self, port: int) -> None:
        self._server = await asyncio.start_server(
            self._on_connect, "127.0.0.1", port, backlog=1024, reuse_address=True,
            ssl=self.ssl_context,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = (f"https://localhost:{self.port}" if self.ssl_context is not None
                    else f"http://127.0.0.1:{self.port}")

    async def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for _ in range(3):  # let connections accepted just before close start their handlers
            await asyncio.sleep(0)
        while self._tasks:
            for conn in list(self._conns):
                conn.abort()
            tasks = list(self._tasks)
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

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
        """Wait until ``streams[index]`` (waiting for it to exist) saw the client go away.

        Returns its ``disconnected_at``; raises TimeoutError.
        """
        async with asyncio.timeout(timeout):
            while True:
                try:
                    record = self.streams[index]
                    break
                except IndexError:
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
            if self._server is not None:
                await self._serve(conn)
        except OSError:
            pass
        except Exception as exc:  # a bug in the fake: surfaced by stop()
            self.errors.append(exc)
        finally:
            await conn.close()
            self._conns.discard(conn)
            self._tasks.discard(task)

    async def _serve(self, conn: _Conn) -> None:
        while True:
            try:
                parsed = await conn.read_request()
            except _BadRequest:
                await conn.respond(400, b"400 Bad Request", _TEXT, keep=False)
                return
            if parsed is None:
                return
            request, keep = parsed
            self.requests.append(request)
            if not await self._dispatch(conn, request, keep):
                return

    async def _dispatch(self, conn: _Conn, req: Request, keep: bool) -> bool:
        """Answer one request; False when the connection must be closed."""
        if self.check_host and not _host_allowed(req.headers.get("host", "")):
            await conn.respond(403, b"", None, keep)
            return keep
        route = self._routes.get(req.path)
        if route is None:
            await conn.respond(404, b"404 page not found", _TEXT_BARE, keep)
            return keep
        methods, handler = route
        if req.method not in methods:
            allow = ", ".join(methods)
            await conn.respond(405, b"405 method not allowed", _TEXT_BARE, keep,
                               extra=[("Allow", allow)])
            return keep
        return await handler(conn, req, keep)

    async def _reply(
        self, conn: _Conn, status: int, obj: Any, keep: bool, head_only: bool = False
    ) -> bool:
        await conn.respond(status, _json(obj), _JSON, keep, head_only)
        return keep

    async def _error(self, conn: _Conn, status: int, message: str, keep: bool) -> bool:
        return await self._reply(conn, status, {"error": message}, keep)

    async def _fault_status(self, conn: _Conn, fault: Fault, keep: bool) -> bool:
        assert fault.status is not None
        if fault.error_body is not None:
            await conn.respond(fault.status, fault.error_body, "text/html", keep)
            return keep
        return await self._error(conn, fault.status, fault.message, keep)

    async def _apply_plain_fault(self, conn: _Conn, fault: Fault, keep: bool) -> bool | None:
        """Status or hang faults on non-generating requests; None when nothing applied."""
        if fault.status is not None:
            return await self._fault_status(conn, fault, keep)
        if fault.hang:
            await conn.eof.wait()
            return False
        return None

    # -- simple endpoints ---------------------------------------------------------------------

    async def _root(self, conn: _Conn, req: Request, keep: bool) -> bool:
        await conn.respond(200, b"Ollama is running", _TEXT, keep, req.method == "HEAD")
        return keep

    async def _version(self, conn: _Conn, req: Request, keep: bool) -> bool:
        return await self._reply(conn, 200, {"version": self.version}, keep, req.method == "HEAD")

    async def _tags(self, conn: _Conn, req: Request, keep: bool) -> bool:
        applied = await self._apply_plain_fault(conn, self._take_fault(req.path, False), keep)
        if applied is not None:
            return applied
        newest = dt.datetime(2026, 4, 1, 12, 0, 0, tzinfo=dt.UTC)
        models = []
        for i, name in enumerate(self.models):
            full = name if name.rfind(":") > name.rfind("/") else f"{name}:latest"
            stamp = (newest - dt.timedelta(hours=i)).strftime("%Y-%m-%dT%H:%M:%S")
            models.append({
                "name": full,
                "model": full,
                "modified_at": f"{stamp}.{123456789 - i}Z",
                "size": 91_739_413 + 4096 * i,
                "digest": hashlib.sha256(full.encode()).hexdigest(),
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "134.52M",
                    "quantization_level": "Q4_1",
                },
            })  # fmt: skip
        return await self._reply(conn, 200, {"models": models}, keep, req.method == "HEAD")

    async def _ps(self, conn: _Conn, req: Request, keep: bool) -> bool:
        """The loaded models, in the layout of the real /api/ps (fewer fields)."""
        running = [{"name": name, "model": name, "size": 190_948_608,
                    "digest": hashlib.sha256(name.encode()).hexdigest(),
                    "expires_at": "2026-04-01T12:05:00.000000000Z", "size_vram": 0,
                    "context_length": 4096} for name in self.loaded]
        return await self._reply(conn, 200, {"models": running}, keep, req.method == "HEAD")

    def _listed_name(self, name: str) -> str:
        """``name`` as /api/tags lists it (a tag added, the installed spelling)."""
        wanted = _normalize_model(name)
        for installed in self.models:
            if _normalize_model(installed) == wanted:
                return installed if installed.rfind(":") > installed.rfind("/") else (
                    installed + ":latest")
        return name

    def _has_model(self, name: str) -> bool:
        wanted = _normalize_model(name)
        return any(_normalize_model(m) == wanted for m in self.models)

    def _can(self, model: str, capability: str) -> bool:
        caps = self.capabilities.get(_normalize_model(model))
        if caps is not None:
            return capability in caps
        return capability != "thinking" or "think" in model.lower()

    async def _embed(self, conn: _Conn, req: Request, keep: bool) -> bool:
        body, error = _decode(req.raw, "EmbedRequest", _EMBED_FIELDS)
        if error:
            return await self._error(conn, 400, error, keep)
        value = body.get("input")
        if isinstance(value, str):
            inputs = [value] if value else []
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            inputs = list(value)
        elif value is None:
            inputs = []
        else:
            return await self._error(conn, 400, "invalid input type", keep)
        model = body.get("model") or ""
        if not model:  # real v0.24.0: 404, quoted like generate's (not 400 "model is required")
            return await self._error(conn, 404, "model '' not found", keep)
        if not self._has_model(model):
            message = f"model {_go_quote(model)} not found, try pulling it first"
            return await self._error(conn, 404, message, keep)
        if error := _option_error(body.get("options")):
            return await self._error(conn, 500, error, keep)
        applied = await self._apply_plain_fault(conn, self._take_fault(req.path, False), keep)
        if applied is not None:
            return applied
        if not inputs:
            return await self._reply(conn, 200, {"model": model, "embeddings": []}, keep)
        dims = body.get("dimensions") or self.embed_dims
        dims = int(dims) if 0 < dims < self.embed_dims else self.embed_dims
        obj = {
            "model": model,
            "embeddings": [_embedding(text, dims) for text in inputs],
            "total_duration": 2_000_000 + 500_000 * len(inputs),
            "load_duration": 1_500_000,
            "prompt_eval_count": sum(max(1, len(text.split())) for text in inputs),
        }
        return await self._reply(conn, 200, obj, keep)

    # -- generate and chat --------------------------------------------------------------------

    async def _generate(self, conn: _Conn, req: Request, keep: bool) -> bool:
        return await self._generate_or_chat(conn, req, keep, chat=False)

    async def _chat(self, conn: _Conn, req: Request, keep: bool) -> bool:
        return await self._generate_or_chat(conn, req, keep, chat=True)

    async def _generate_or_chat(self, conn: _Conn, req: Request, keep: bool, chat: bool) -> bool:
        fields = _CHAT_FIELDS if chat else _GENERATE_FIELDS
        body, error = _decode(req.raw, "ChatRequest" if chat else "GenerateRequest", fields)
        if error:
            return await self._error(conn, 400, error, keep)
        top = body.get("top_logprobs")
        if top is not None and not 0 <= top <= 20:
            return await self._error(conn, 400, "top_logprobs must be between 0 and 20", keep)
        model: str = body.get("model") or ""
        if not model and chat:
            return await self._error(conn, 400, "model is required", keep)
        if not model or not self._has_model(model):
            return await self._error(conn, 404, f"model '{model}' not found", keep)
        if body.get("raw") is True and (
            body.get("template") or body.get("system") or body.get("context")
        ):
            message = "raw mode does not support template, system, or context"
            return await self._error(conn, 400, message, keep)
        empty = not (body.get("messages") if chat else body.get("prompt"))
        if empty and _keep_alive_zero(body.get("keep_alive")):
            listed = self._listed_name(model)
            if listed in self.loaded:
                self.loaded.remove(listed)
            return await self._reply(conn, 200, self._load_object(model, chat, "unload"), keep)
        think = body.get("think")
        if think is not None and think is not False and not self._can(model, "thinking"):
            message = f"{_go_quote(model)} does not support thinking"
            return await self._error(conn, 400, message, keep)
        for wanted, capability in ((body.get("tools"), "tools"), (body.get("suffix"), "insert")):
            if wanted and not self._can(model, capability):
                message = f"{_normalize_model(model)} does not support {capability}"
                return await self._error(conn, 400, message, keep)
        if error := _option_error(body.get("options")):
            return await self._error(conn, 500, error, keep)
        fault = self._take_fault(req.path, True)
        if fault.status is not None:
            return await self._fault_status(conn, fault, keep)
        if empty:
            if (listed := self._listed_name(model)) not in self.loaded:
                self.loaded.append(listed)
            load = self._load_object(model, chat, "load")
            return await self._run_whole(conn, keep, fault, None, 1, lambda _n, _c: load)
        streaming = body.get("stream") is not False
        if error := _format_error(body.get("format")):
            if streaming:  # raised in the streaming goroutine: bare Content-Type, chunked
                await conn.respond(500, _json({"error": error}), _JSON_BARE, keep, chunked=True)
                return keep
            return await self._error(conn, 500, error, keep)
        answer = _Answer(self, chat, body, model)
        if (listed := self._listed_name(model)) not in self.loaded:
            self.loaded.append(listed)
        return await self._run_answer(conn, req, keep, fault, answer, streaming)

    def _load_object(self, model: str, chat: bool, reason: str) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": model, "created_at": _now()}
        if chat:
            obj["message"] = {"role": "assistant", "content": ""}
        else:
            obj["response"] = ""
        obj.update(done=True, done_reason=reason)
        return obj

    async def _run_answer(
        self, conn: _Conn, req: Request, keep: bool, fault: Fault, answer: _Answer,
        streaming: bool,
    ) -> bool:  # fmt: skip
        loop = asyncio.get_running_loop()
        record = StreamRecord(req.path, answer.model, started_at=loop.time(), stream=streaming)
        self.streams.append(record)
        self._stream_added.set()
        self._stream_added = asyncio.Event()
        self.active_streams += 1
        self.max_active_streams = max(self.max_active_streams, self.active_streams)
        conn.record = record
        try:
            if fault.hang:
                await conn.eof.wait()
                return False
            if fault.raw_body is not None:
                if await conn.pause(fault.delay_first):
                    return False
                conn.begin_chunked(keep)
                record._end(False)
                await conn.chunk(fault.raw_body, last=True)
                return keep
            if streaming:
                return await self._run_stream(conn, keep, fault, record, answer)
            return await self._run_whole(conn, keep, fault, record, answer.items, answer.whole)
        except ConnectionError:
            record._gone(loop.time())
            return False
        finally:
            conn.record = None
            record._end(False)
            self.active_streams -= 1

    async def _run_stream(
        self, conn: _Conn, keep: bool, fault: Fault, record: StreamRecord, answer: _Answer
    ) -> bool:
        conn.begin_chunked(keep)
        for i in range(answer.items):
            if await conn.pause(fault.delay_first if i == 0 else self.token_delay):
                return False
            action = fault._action(i)
            if action == "drop":
                record._end(False)
                conn.abort()
                return False
            if action == "hang":
                await conn.eof.wait()
                return False
            if action in ("error", "truncate"):
                record._end(False)
                line = _json({"error": fault.message}) + b"\n" if action == "error" else b""
                await conn.chunk(line, last=True)
                return keep
            last = i == answer.items - 1
            line = _json(answer.chunk(i)) + b"\n"
            record.chunks_sent = i + 1
            if last:
                record._end(True)
            await conn.chunk(line, last=last)
        return keep

    async def _run_whole(
        self, conn: _Conn, keep: bool, fault: Fault, record: StreamRecord | None, total: int,
        result: Callable[[int, bool], dict[str, Any]],
    ) -> bool:  # fmt: skip
        """Produce ``total`` items internally, then reply with one JSON object."""
        if fault.hang:
            await conn.eof.wait()
            return False
        for i in range(total):
            if await conn.pause(fault.delay_first if i == 0 else self.token_delay):
                return False
            action = fault._action(i)
            if action == "drop":
                if record is not None:
                    record._end(False)
                conn.abort()
                return False
            if action == "hang":
                await conn.eof.wait()
                return False
            if action in ("error", "truncate"):
                if record is not None:
                    record._end(False)
                if action == "error":
                    return await self._error(conn, 500, fault.message, keep)
                return await self._reply(conn, 200, result(i, False), keep)
            if record is not None:
                record.chunks_sent = i + 1
        obj = result(total, True)
        if record is not None:
            record._end(True)
        return await self._reply(conn, 200, obj, keep)


# --------------------------------------------------------------------------------------------
# As a process: `python -m tests.fakeollama --port 0 --token-delay 0.05` (scripts/cluster
# uses it when no real Ollama is at hand). Prints its URL on stdout, serves until SIGTERM.


async def _serve(port: int, token_delay: float, models: list[str]) -> None:
    import signal

    fake = FakeOllama(models=models, tokens=[f"w{i} " for i in range(40)],
                      token_delay=token_delay)
    await fake._listen(port)
    fake._started = True
    print(fake.url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():  # the records are for tests; a long-lived process drops them
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 10)
        del fake.requests[:], fake.streams[:], fake.errors[:]
    await fake._shutdown()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the test Ollama as a process, on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-delay", type=float, default=0.05, help="seconds per token")
    parser.add_argument("--model", action="append", help="installed model (repeatable; "
                        "default: tiny:latest and smollm2:135m)")
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.token_delay, args.model or ["tiny:latest",
                                                                    "smollm2:135m"]))
