"""A lean HTTP/1.1 client for an engine's NDJSON stream on plain http://, built on
an asyncio Protocol.

One TCP connection per stream, kept alive in a LIFO idle list. The response is
parsed in data_received (status line, headers, chunked or length framing),
NDJSON lines are split and decoded right there (by the backend's ``decode``:
one line, one neutral event), and the events are handed on from that callback:
to a sink (``deliver``, the relay's path: no task wakes up per chunk) or to a
queue (iteration). No per-chunk
generator stack, no per-request pool scan, and the request goes out in one write.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .._exceptions import (
    ProtocolError,
    TruncatedStream,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
)
from ._base import Decode, Event

_HEAD, _SIZE, _DATA, _CRLF, _TRAILER, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)
_END = object()
_HIGH_WATER = 4096
_LOW_WATER = 1024
_MAX_HEAD = 64 * 1024
#: Most of a non-200 body kept before ``read_body`` sets its own bound.
_MAX_RAW = 64 * 1024
#: Longest NDJSON line accepted (Ollama's own client allows 8 MiB); both stream paths use it.
MAX_LINE_BYTES = 8 * 1024 * 1024

#: Takes one event and the size of its line in bytes; returns True when it wants no
#: more for now (reading pauses until ``Response.resume``).
Sink = Callable[[Event, int], bool]


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
    """One response: ``status`` once open; iterate it for parsed NDJSON chunks."""

    def __init__(self, conn: _Conn, decode: Decode, where: str) -> None:
        self._conn = conn
        self._loop = asyncio.get_running_loop()
        self._decode = decode
        self._where = where
        self._buf = bytearray()
        self._line = b""
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._state = _HEAD
        self._remaining = 0
        self._raw: bytearray | None = None  # body of a non-200 answer
        self._raw_limit = _MAX_RAW  # read no more of it than this (read_body's bound)
        self._raw_cut = False  # the bound was reached: the rest is not read
        self._saw_done = False
        self._stopped = False  # an error item was queued; ignore the rest
        self._paused = False
        self._ended = False
        self._sink: Sink | None = None
        self._outcome: asyncio.Future[None] | None = None  # deliver()'s end
        self.status = 0
        self.keep_alive = True
        self.complete = False
        self.got_bytes = False

    # -- protocol side ---------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self.got_bytes = True
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        try:
            while pos < n or self._state == _TRAILER:
                state = self._state
                if state == _SIZE:
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        break
                    size = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
                    pos = end + 2
                    if size:
                        self._remaining = size
                        self._state = _DATA
                    else:
                        self._state = _TRAILER
                elif state == _DATA:
                    take = min(n - pos, self._remaining)
                    self._body(bytes(buf[pos:pos + take]))
                    pos += take
                    self._remaining -= take
                    if not self._remaining:
                        self._state = _CRLF
                elif state == _CRLF:
                    if n - pos < 2:
                        break
                    if buf[pos:pos + 2] != b"\r\n":
                        raise ProtocolError("bad chunk framing from Ollama")
                    pos += 2
                    self._state = _SIZE
                elif state == _TRAILER:
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        break
                    blank = end == pos
                    pos = end + 2
                    if blank:
                        self._finish()
                        break
                elif state == _HEAD:
                    end = buf.find(b"\r\n\r\n", pos)
                    if end < 0:
                        if n - pos > _MAX_HEAD:
                            raise ProtocolError("Ollama sent too large a response head")
                        break
                    self._parse_head(bytes(buf[pos:end]))
                    pos = end + 4
                elif state == _LENGTH:
                    take = min(n - pos, self._remaining)
                    self._body(bytes(buf[pos:pos + take]))
                    pos += take
                    self._remaining -= take
                    if not self._remaining:
                        self._finish()
                elif state == _UNTIL_CLOSE:
                    self._body(bytes(buf[pos:]))
                    pos = n
                else:  # _DONE: bytes after the end of the response
                    self.keep_alive = False
                    pos = n
        except (ValueError, ProtocolError) as exc:
            err = exc if isinstance(exc, ProtocolError) else ProtocolError(
                f"Ollama sent a malformed HTTP response ({exc})")
            self._fail(err)
            pos = n
        del buf[:pos]
        if self._items:
            self._wake()
            if len(self._items) >= _HIGH_WATER and not self._paused and self._conn.transport:
                self._paused = True
                self._conn.transport.pause_reading()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError("Ollama sent something that is not an HTTP/1.x response")
        status = int(parts[1])
        if 100 <= status < 200:
            return  # interim answer; the real head follows
        chunked, length = False, None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value:
                self.keep_alive = False
        if parts[0] == b"HTTP/1.0":
            self.keep_alive = False
        self.status = status
        if status != 200:
            self._raw = bytearray()
        if chunked:
            self._state = _SIZE
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH
            if not length:
                self._finish()
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        if not self._head.done():
            self._head.set_result(None)

    def _body(self, data: bytes) -> None:
        if self._raw is not None:
            if not self._raw_cut:
                self._raw += data
                if len(self._raw) >= self._raw_limit:
                    self._raw_cut = True  # enough to classify it; never reused
                    self.keep_alive = False
                    self._wake()
            return
        if self._stopped:
            return
        if self._line:
            data = self._line + data
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            line = data[start:end]
            start = end + 1
            if line.strip():
                self._emit(line)
                if self._stopped:
                    return
        self._line = data[start:]
        if len(self._line) > MAX_LINE_BYTES:
            self._fail(ProtocolError(f"Ollama sent a line longer than {MAX_LINE_BYTES} bytes"))

    def _emit(self, line: bytes) -> None:
        try:
            event = self._decode(line)
        except UpstreamError as exc:
            self._fail(exc)
            return
        if event[3] is not None:
            self._saw_done = True
        sink = self._sink
        if sink is None:
            self._items.append((event, len(line)))
        elif sink(event, len(line)) and not self._paused and self._conn.transport:
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
        self._state = _DONE
        self.complete = True
        if self._raw is None and not self._stopped:
            if self._line.strip():  # a plain JSON body has no trailing newline
                self._emit(self._line)
                self._line = b""
            if not self._stopped:
                if self._saw_done:
                    self._items.append(_END)
                else:
                    self._fail(TruncatedStream(
                        "Ollama ended the stream without a final (done) message; "
                        "the answer is incomplete"))
        self._wake()

    def _eof(self, exc: Exception | None) -> None:
        if self._state == _UNTIL_CLOSE:
            self._finish()
        elif not self.complete:
            self._fail(UpstreamDisconnected(
                f"Ollama at {self._where} closed the connection "
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
        """Hands every chunk to ``sink`` from the protocol callback as it is
        parsed, and returns once the stream ended (raises its error). When the
        sink says it is full, reading pauses until ``resume()``."""
        while self._items:  # parsed before we were called (e.g. with the head)
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
        """The next chunk and the size of its line in bytes."""
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


class NDJSONPool:
    """Keep-alive connections to one http:// Ollama, at most ``max_connections``."""

    def __init__(self, base_url: str, *, connect_timeout: float, max_connections: int,
                 where: str = "", authorization: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("the lean client speaks plain http:// only")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._prefix = parts.path.rstrip("/")
        netloc = parts.netloc.rpartition("@")[2]
        self._host_header = netloc.encode("idna")
        self._where = where or base_url
        self._authorization = (b"Authorization: " + authorization.encode("latin-1") + b"\r\n"
                               if authorization else b"")
        self._connect_timeout = connect_timeout
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        #: Connections carrying a response now (opened and not yet released).
        self.in_use = 0

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(_Conn, self._host, self._port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(
                f"cannot reach Ollama at {self._where} ({type(exc).__name__}: {exc}); "
                "check that Ollama is running there, or point --ollama-url/OLLAMA_HOST at it"
            ) from None
        return conn

    async def open(self, path: str, body: bytes, decode: Decode) -> Response:
        """Sends the request; returns the response once its head arrived. Each line
        of its body will be decoded by ``decode``."""
        request = b"".join((
            b"POST ", (self._prefix + path).encode(), b" HTTP/1.1\r\nHost: ", self._host_header,
            b"\r\nAccept: application/x-ndjson, application/json\r\n"
            b"Content-Type: application/json\r\nUser-Agent: tokenwire\r\n", self._authorization,
            b"Content-Length: ",
            str(len(body)).encode(), b"\r\n\r\n", body))
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
                response = Response(conn, decode, self._where)
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
