"""The lean HTTP/1.1 client that streams an engine's answer, over http:// or https://.

One connection per stream, kept alive in a LIFO idle list per upstream. The
response is parsed in the Protocol's ``data_received`` by llhttp (httptools, the
parser under uvicorn: status line, headers, chunked or length framing), its body
is cut into frames right there (NDJSON lines, or Server-Sent Events for the
OpenAI-compatible engines), each frame is decoded once by the backend into a
neutral event, and the events are handed on from that callback: to a sink
(``deliver``, the relay's path: no task wakes up per chunk) or to a queue
(iteration). The request goes out in one write.

Why not httpx for streams: its per-chunk generator stack and pool scans were over
half the gateway's CPU per token (README, Performance). Why llhttp rather than our
own parser: one well-kept, fuzzed parser for both engines and TLS, at the same
cost per line (``bench/transport.py`` measures it against the hand-written parser
it replaced, aiohttp and httpx; the figures are in its docstring and the README).

SSE is framed by hand (``_SSE``): no well-kept library offers an incremental,
push-style event decoder that can be fed from ``data_received`` (httpx-sse and
openai-python decode lines pulled from their own HTTP clients). It follows the
WHATWG rules: events end with a blank line, lines end with CRLF, LF or CR,
``data:`` lines join with newlines, ``:`` starts a comment.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools

from .._exceptions import (
    ProtocolError,
    TruncatedStream,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
)
from ._base import Decode, Event

__all__ = ["MAX_LINE_BYTES", "Framing", "Response", "SSEDecode", "Sink", "StreamPool"]

_END = object()
_HIGH_WATER = 4096
_LOW_WATER = 1024
#: Most of a non-200 body kept before ``read_body`` sets its own bound.
_MAX_RAW = 64 * 1024
#: Longest frame (NDJSON line, SSE event) accepted; Ollama's own client allows 8 MiB.
MAX_LINE_BYTES = 8 * 1024 * 1024

#: Takes one event and the size of its frame in bytes; returns True when it wants no
#: more for now (reading pauses until ``Response.resume``).
Sink = Callable[[Event, int], bool]
#: Decodes one Server-Sent Event (its type, "message" when none was given, and its
#: data) into an event, or None when it carries nothing to deliver.
SSEDecode = Callable[[str, bytes], "Event | None"]
#: How an answer's body is cut into frames, with the decoder for them.
Framing = tuple[str, Any]  # ("ndjson", Decode) | ("sse", SSEDecode)


class _NDJSON:
    """One frame per line; a last line without a newline is a frame too (a whole JSON
    body, as Ollama's load and unload answers are)."""

    __slots__ = ("_decode", "_line", "_out")

    def __init__(self, decode: Decode, out: Callable[[Event, int], None]) -> None:
        self._decode = decode
        self._out = out
        self._line = b""

    def feed(self, data: bytes) -> None:
        if self._line:
            data = self._line + data
        start = 0
        decode, out = self._decode, self._out
        while (end := data.find(b"\n", start)) != -1:
            line = data[start:end]
            start = end + 1
            if line.strip():
                out(decode(line), len(line))
        self._line = data[start:]
        if len(self._line) > MAX_LINE_BYTES:
            raise ProtocolError(f"the engine sent a line longer than {MAX_LINE_BYTES} bytes")

    def end(self) -> None:
        line, self._line = self._line, b""
        if line.strip():
            self._out(self._decode(line), len(line))


class _SSE:
    """Server-Sent Events: each event's data (``data:`` lines joined with newlines)
    and type go to the decoder once its blank line arrives."""

    __slots__ = ("_cr", "_data", "_decode", "_kind", "_line", "_out", "_size")

    def __init__(self, decode: SSEDecode, out: Callable[[Event, int], None]) -> None:
        self._decode = decode
        self._out = out
        self._line = b""  # an unterminated line
        self._cr = False  # the last byte fed was a CR: a LF right after it ends nothing
        self._data: list[bytes] = []
        self._kind = ""
        self._size = 0

    def feed(self, data: bytes) -> None:
        if self._cr and data.startswith(b"\n"):
            data = data[1:]
        self._cr = data.endswith(b"\r")
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._line:
            data = self._line + data
        start = 0
        size = len(data)
        decode, out = self._decode, self._out
        while (end := data.find(b"\n", start)) != -1:
            if (end + 1 < size and data[end + 1] == 10 and not self._data
                    and data.startswith(b"data: ", start)):
                # The common event, one "data: " line then the blank line: whole, at once.
                value = data[start + 6:end]
                start = end + 2
                if len(value) > MAX_LINE_BYTES:
                    raise ProtocolError(
                        f"the engine sent an event longer than {MAX_LINE_BYTES} bytes")
                kind = self._kind
                if kind:
                    self._kind = ""
                event = decode(kind or "message", value)
                if event is not None:
                    out(event, len(value))
                continue
            self._field(data[start:end])
            start = end + 1
        self._line = data[start:]
        if len(self._line) + self._size > MAX_LINE_BYTES:
            raise ProtocolError(f"the engine sent an event longer than {MAX_LINE_BYTES} bytes")

    def _field(self, line: bytes) -> None:
        if not line:  # the blank line: dispatch
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                kind = self._kind or "message"
                self._data, self._kind, self._size = [], "", 0
                event = self._decode(kind, data)
                if event is not None:
                    self._out(event, len(data))
            else:
                self._kind = ""
            return
        if line[0] == 0x3A:  # ":" a comment, e.g. a keep-alive
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._size += len(value)
            if self._size > MAX_LINE_BYTES:
                raise ProtocolError(
                    f"the engine sent an event longer than {MAX_LINE_BYTES} bytes")
        elif name == b"event":
            self._kind = value.decode("utf-8", "replace")
        # id and retry are for browsers reconnecting; a gateway does not reconnect.

    def end(self) -> None:
        """An event not closed by a blank line when the body ended is dropped, as the
        SSE rules say. A decoder with an ``end()`` is asked for a last event then (an
        answer that gave its finish reason but no ``[DONE]``); without one the stream
        has no final event: truncated."""
        finish = getattr(self._decode, "end", None)
        event = finish() if finish is not None else None
        if event is not None:
            self._out(event, 0)


_FRAMERS: dict[str, Any] = {"ndjson": _NDJSON, "sse": _SSE}


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.response: Response | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is not None:
            self.response._feed(data)
        else:  # nothing is expected on an idle connection
            self.closed = True
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._eof(exc)


class Response:
    """One response: ``status`` once open; iterate it for ``(event, frame size)``
    pairs, or hand a sink to ``deliver``."""

    def __init__(self, conn: _Conn, framing: Framing, where: str, engine: str) -> None:
        self._conn = conn
        self._loop = asyncio.get_running_loop()
        self._where = where
        self._engine = engine
        self._parser = httptools.HttpResponseParser(self)
        self._framer = _FRAMERS[framing[0]](framing[1], self._deliver)
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._raw: bytearray | None = None  # body of a non-200 answer
        self._raw_limit = _MAX_RAW  # read no more of it than this (read_body's bound)
        self._raw_cut = False  # the bound was reached: the rest is not read
        self._until_close = False  # no length, not chunked: the body ends with the connection
        self._headers_seen = False
        self._saw_done = False
        self._stopped = False  # an error item was queued; ignore the rest
        self._paused = False
        self._ended = False
        self._sink: Sink | None = None
        self._outcome: asyncio.Future[None] | None = None  # deliver()'s end
        self._length = False
        self._chunked = False
        self.status = 0
        #: The answer's headers, by lowercase name (say, retry-after on a 429).
        self.headers: dict[bytes, bytes] = {}
        self.keep_alive = True
        self.complete = False
        self.got_bytes = False

    # -- llhttp's callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers[name] = value
        if name == b"content-length":
            self._length = True
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._length = self._chunked = False
            self.headers.clear()
            return  # an interim answer: the real head follows
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        self._headers_seen = True
        if status != 200:
            self._raw = bytearray()
        if not self._length and not self._chunked:
            self._until_close = True
            self.keep_alive = False
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        raw = self._raw
        if raw is not None:
            if not self._raw_cut:
                raw += body
                if len(raw) >= self._raw_limit:
                    self._raw_cut = True  # enough to classify it; never reused
                    self.keep_alive = False
                    self._wake()
            return
        if self._stopped:
            return
        try:
            self._framer.feed(body)
        except UpstreamError as exc:
            self._fail(exc)

    def on_message_complete(self) -> None:
        if self._headers_seen:
            self._finish()

    # -- protocol side -------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the engine tried to upgrade the HTTP connection"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"{self._engine} at {self._where} sent a malformed HTTP "
                                     f"response ({exc})"))
        if self._items:
            self._wake()
            if len(self._items) >= _HIGH_WATER and not self._paused and self._conn.transport:
                self._paused = True
                self._conn.transport.pause_reading()

    def _deliver(self, event: Event, size: int) -> None:
        if event[3] is not None:
            self._saw_done = True
        sink = self._sink
        if sink is None:
            self._items.append((event, size))
        elif sink(event, size) and not self._paused and self._conn.transport:
            self._paused = True
            self._conn.transport.pause_reading()

    def _fail(self, exc: BaseException) -> None:
        if not self._stopped:
            self._stopped = True
            self.keep_alive = False
            self._items.append(exc)
        if not self._head.done():
            self._head.set_exception(exc)
        self._wake()

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        if self._raw is None and not self._stopped:
            try:
                self._framer.end()
            except UpstreamError as exc:
                self._fail(exc)
            if not self._stopped:
                if self._saw_done:
                    self._items.append(_END)
                else:
                    self._fail(TruncatedStream(
                        f"{self._engine} ended the stream without a final message; the answer "
                        "is incomplete"))
        self._wake()

    def _eof(self, exc: Exception | None) -> None:
        if self._until_close and exc is None:
            self._finish()
        elif not self.complete:
            self._fail(UpstreamDisconnected(
                f"{self._engine} at {self._where} closed the connection "
                f"({type(exc).__name__ if exc else 'EOF'}); the answer is incomplete"))
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        outcome = self._outcome
        if outcome is not None and not outcome.done() and self._items:
            item = self._items[0]  # only the end or an error is queued in sink mode
            if isinstance(item, BaseException):
                outcome.set_exception(item)
            else:
                outcome.set_result(None)

    # -- caller side ---------------------------------------------------------------------

    async def wait_head(self) -> None:
        await self._head

    async def read_body(self, limit: int) -> bytes:
        """The body of a non-200 answer, at most ``limit`` bytes of it."""
        self._raw_limit = limit
        if self._raw is not None and len(self._raw) >= limit:
            self._raw_cut = True
            self.keep_alive = False
        while not self.complete and not self._stopped and not self._raw_cut:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return bytes(self._raw or b"")[:limit]

    async def deliver(self, sink: Sink) -> None:
        """Hands every event to ``sink`` from the protocol callback as it is
        decoded, and returns once the stream ended (raises its error). When the
        sink says it is full, reading pauses until ``resume()``."""
        while self._items:  # decoded before we were called (e.g. with the head)
            item = self._items.popleft()
            if item is _END:
                self._ended = True
                return
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if sink(*item) and not self._paused and self._conn.transport:
                self._paused = True
                self._conn.transport.pause_reading()
        self._sink = sink
        self._outcome = self._loop.create_future()
        self._wake()  # the end may already be queued
        try:
            await self._outcome
        finally:
            self._ended = True

    def resume(self) -> None:
        """Reading goes on after the sink said it was full."""
        if self._paused and self._conn.transport:
            self._paused = False
            self._conn.transport.resume_reading()

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> tuple[Event, int]:
        """The next event and the size of its frame in bytes."""
        items = self._items
        while not items:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if self._paused and len(items) <= _LOW_WATER and self._conn.transport:
            self._paused = False
            self._conn.transport.resume_reading()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item  # type: ignore[no-any-return]


class StreamPool:
    """Keep-alive connections to one upstream (http:// or https://), at most
    ``max_connections``. ``headers`` go with every request (e.g. Authorization);
    ``ssl_context`` verifies an https:// upstream (default: the system's CAs)."""

    def __init__(self, base_url: str, *, connect_timeout: float, max_connections: int,
                 where: str = "", headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None, engine: str = "the engine",
                 hint: str = "check that it is running there and that its URL is right",
                 ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {base_url}")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if self._tls else None
        self._prefix = parts.path.rstrip("/")
        netloc = parts.netloc.rpartition("@")[2]
        self._host_header = netloc.encode("idna")
        self._where = where or base_url
        self._engine = engine
        self._hint = hint
        self._headers = b"".join(
            name.encode("latin-1") + b": " + value.encode("latin-1") + b"\r\n"
            for name, value in (headers or {}).items())
        self._connect_timeout = connect_timeout
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        #: Connections carrying a response now (opened and not yet released).
        self.in_use = 0

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    _Conn, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._tls else None)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise UpstreamConnectError(
                f"cannot reach {self._engine} at {self._where} ({type(exc).__name__}: {exc}); "
                + self._hint
            ) from None
        return conn

    async def open(self, path: str, body: bytes, framing: Framing, *,
                   accept: bytes = b"application/x-ndjson, application/json",
                   headers: bytes = b"") -> Response:
        """Sends the request; returns the response once its head arrived. Its body is
        cut and decoded as ``framing`` says. ``headers``: more header lines, each
        ending with CRLF (a trace's ``traceparent``)."""
        request = b"".join((
            b"POST ", (self._prefix + path).encode(), b" HTTP/1.1\r\nHost: ", self._host_header,
            b"\r\nAccept: ", accept, b"\r\nContent-Type: application/json\r\n"
            b"User-Agent: tokenwire\r\n", self._headers, headers,
            b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body))
        await self._slots.acquire()
        try:
            while True:
                reused = False
                while self._idle:
                    conn = self._idle.pop()
                    if not conn.closed:
                        reused = True
                        break
                else:
                    conn = await self._connect()
                response = Response(conn, framing, self._where, self._engine)
                conn.response = response
                assert conn.transport is not None
                conn.transport.write(request)
                try:
                    await response.wait_head()
                except UpstreamDisconnected:
                    conn.response = None
                    if reused and not response.got_bytes:
                        continue  # a kept-alive connection the server had just closed
                    raise
                except BaseException:
                    conn.response = None
                    conn.closed = True
                    conn.transport.close()
                    raise
                self.in_use += 1
                return response
        except BaseException:
            self._slots.release()
            raise

    def release(self, response: Response) -> None:
        self.in_use -= 1
        conn = response._conn
        conn.response = None
        if response.complete and response.keep_alive and not conn.closed:
            # A sink may have paused reading just before the end arrived: an idle
            # connection must read (the next answer, or the server closing it).
            response.resume()
            self._idle.append(conn)
        else:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        self._slots.release()

    def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
