"""The streaming transport against a raw loopback server that writes exact bytes:
framing split anywhere, length and chunked bodies, errors, EOF, keep-alive; NDJSON
and Server-Sent Events; http:// and https:// (real certificates)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from tests.reliability.pki import make_pki
from tokenwire.service import (
    ProtocolError,
    TruncatedStream,
    UpstreamConnectError,
    UpstreamDisconnected,
)
from tokenwire.service.backends import Event, Final
from tokenwire.service.backends._transport import StreamPool
from tokenwire.service.backends.ollama._answers import generate_event
from tokenwire.v1 import generation_pb2 as pb

DONE = orjson.dumps({"response": "", "done": True}) + b"\n"
A = orjson.dumps({"response": "a", "done": False}) + b"\n"


def chunked(*parts: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n")


Reply = Callable[[int], bytes]  # request number -> bytes to send


class RawServer:
    """Answers each request with exact bytes, in pieces of ``step`` bytes."""

    def __init__(self, reply: Reply, *, step: int = 0, close_after: bool = False) -> None:
        self.reply, self.step, self.close_after = reply, step, close_after
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                data = self.reply(len(self.requests))
                step = self.step or len(data)
                for i in range(0, len(data), step):
                    writer.write(data[i:i + step])
                    await writer.drain()
                    await asyncio.sleep(0)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    servers: list[asyncio.Server] = []
    pools: list[StreamPool] = []

    async def start(raw: RawServer, *, tls: ssl.SSLContext | None = None,
                    trust: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> StreamPool:
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        scheme = "https" if tls is not None else "http"
        pool = StreamPool(f"{scheme}://{host}:{port}", connect_timeout=2, max_connections=4,
                          ssl_context=trust)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def _read(pool: StreamPool) -> list[dict[str, object]]:
    response = await pool.open("/api/generate", b'{"model":"m"}', ("ndjson", generate_event))
    try:
        assert response.status == 200
        return [chunk async for chunk, _ in response]
    finally:
        pool.release(response)


@pytest.mark.parametrize("step", [0, 1, 3, 7])
async def test_chunked_stream_split_anywhere(serve: Callable[..., object], step: int) -> None:
    pool = await serve(RawServer(lambda n: chunked(A[:5], A[5:] + DONE), step=step))
    chunks = await _read(pool)  # type: ignore[arg-type]
    assert [c[0] for c in chunks] == ["a", ""]


async def test_length_body_without_newline_and_keep_alive(serve: Callable[..., object]) -> None:
    body = orjson.dumps({"response": "", "done": True, "done_reason": "load"})
    raw = RawServer(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body))
    pool = await serve(raw)
    for _ in range(3):
        final = (await _read(pool))[0][3]  # type: ignore[arg-type]
        assert final is not None and final.usage.engine_finish_reason == "load"
    assert raw.connections == 1  # one kept-alive connection served all three
    assert raw.requests[0].startswith(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_non_200_body_is_read_whole(serve: Callable[..., object]) -> None:
    error = b'{"error":"model \'x\' not found"}'
    pool: StreamPool = await serve(RawServer(  # type: ignore[assignment]
        lambda n: b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(error), error),
        step=5))
    response = await pool.open("/api/generate", b"{}", ("ndjson", generate_event))
    assert response.status == 404
    assert await response.read_body(1 << 16) == error
    pool.release(response)


async def test_end_without_done_is_truncated(serve: Callable[..., object]) -> None:
    pool = await serve(RawServer(lambda n: chunked(A)))
    with pytest.raises(TruncatedStream):
        await _read(pool)  # type: ignore[arg-type]


async def test_connection_lost_mid_stream(serve: Callable[..., object]) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pool = await serve(RawServer(lambda n: head + b"%x\r\n%s\r\n" % (len(A), A),
                                 close_after=True))
    with pytest.raises(UpstreamDisconnected):
        await _read(pool)  # type: ignore[arg-type]


async def test_garbage_is_a_protocol_error(serve: Callable[..., object]) -> None:
    pool = await serve(RawServer(lambda n: b"SSH-2.0-OpenSSH\r\n\r\n", close_after=True))
    with pytest.raises(ProtocolError):
        await _read(pool)  # type: ignore[arg-type]


async def test_stale_kept_alive_connection_is_replaced(serve: Callable[..., object]) -> None:
    # The server closes after every answer, without saying so: the next request
    # finds its kept-alive connection dead and must go out on a new one.
    raw = RawServer(lambda n: chunked(A + DONE), close_after=True)
    pool = await serve(raw)
    await _read(pool)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert [c[0] for c in await _read(pool)] == ["a", ""]  # type: ignore[arg-type]
    assert raw.connections == 2


async def test_a_stream_that_ends_while_paused_leaves_a_reusable_connection(
        serve: Callable[..., object]) -> None:
    # The sink is "full" after every chunk and the whole answer arrives at once, so the
    # stream ends while reading is paused and nobody resumes it. The kept-alive connection
    # must still read the next answer (it hung for ever once: the benchmark's single
    # back-to-back stream stopped after three answers).
    raw = RawServer(lambda n: chunked(A * 5 + DONE))
    pool: StreamPool = await serve(raw)  # type: ignore[assignment]

    async def one() -> list[object]:
        got: list[object] = []

        def sink(chunk: dict[str, object], size: int) -> bool:
            got.append(chunk[0])
            return True

        response = await pool.open("/api/generate", b"{}", ("ndjson", generate_event))
        try:
            await response.deliver(sink)
        finally:
            pool.release(response)
        return got

    for _ in range(3):
        assert await asyncio.wait_for(one(), 5) == ["a"] * 5 + [""]
    assert raw.connections == 1


# -- https --------------------------------------------------------------------------


def _tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    pki = make_pki(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki.server.cert_path, pki.server.key_path)
    return server, ssl.create_default_context(cafile=str(pki.ca_path))


async def test_https_stream_with_a_verified_certificate(serve: Callable[..., object],
                                                        tmp_path: Path) -> None:
    server, trust = _tls_pair(tmp_path)
    raw = RawServer(lambda n: chunked(A, A + DONE), step=3)
    pool = await serve(raw, tls=server, trust=trust, host="localhost")
    for _ in range(2):
        assert [c[0] for c in await _read(pool)] == ["a", "a", ""]  # type: ignore[arg-type]
    assert raw.connections == 1  # kept alive over TLS too


async def test_https_refuses_a_certificate_it_cannot_verify(serve: Callable[..., object],
                                                            tmp_path: Path) -> None:
    server, _ = _tls_pair(tmp_path)  # the client trusts only the system's CAs
    pool = await serve(RawServer(lambda n: chunked(A + DONE)), tls=server, host="localhost")
    with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        await _read(pool)  # type: ignore[arg-type]


# -- Server-Sent Events -------------------------------------------------------------

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def sse(body: bytes) -> bytes:
    return SSE_HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


class _Decoder:
    """Records what the framer hands over; [DONE] ends the answer."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    def __call__(self, kind: str, data: bytes) -> Event | None:
        self.seen.append((kind, data))
        if data == b"[DONE]":
            return ("", "", None, Final(pb.FINISH_REASON_STOP, pb.Usage()))
        if kind == "ping":
            return None
        return (data.decode(), "", None, None)


async def _read_sse(pool: StreamPool) -> tuple[list[str], _Decoder]:
    decoder = _Decoder()
    response = await pool.open("/v1/chat/completions", b"{}", ("sse", decoder),
                               accept=b"text/event-stream")
    try:
        return [event[0] async for event, _ in response], decoder
    finally:
        pool.release(response)


SSE_BODY = (b": keep-alive comment\n\n"
            b"data: one\n\n"
            b"event: ping\ndata: {}\n\n"
            b"data: two\r\ndata: lines\r\n\r\n"
            b"data:three\r\r"
            b"id: 7\nretry: 10\ndata: four\n\n"
            b"data: [DONE]\n\n")


@pytest.mark.parametrize("step", [0, 1, 2, 5, 13])
async def test_sse_events_not_network_reads(serve: Callable[..., object], step: int) -> None:
    """Events end with a blank line, whatever the reads: LF, CRLF and CR line ends, comments
    dropped, several data lines joined with a newline, the event type passed on."""
    pool = await serve(RawServer(lambda n: sse(SSE_BODY), step=step))
    texts, decoder = await _read_sse(pool)  # type: ignore[arg-type]
    assert texts == ["one", "two\nlines", "three", "four", ""]
    assert decoder.seen == [("message", b"one"), ("ping", b"{}"), ("message", b"two\nlines"),
                            ("message", b"three"), ("message", b"four"),
                            ("message", b"[DONE]")]


async def test_sse_cr_then_lf_across_reads_is_one_line_end(
        serve: Callable[..., object]) -> None:
    body = b"data: a\r\ndata: b\r\n\r\ndata: [DONE]\r\n\r\n"
    cut = body.index(b"\n") - 1 + 1  # the first read ends right after a CR
    pool = await serve(RawServer(lambda n: SSE_HEAD + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        cut, body[:cut], len(body) - cut, body[cut:]), step=0))
    texts, _ = await _read_sse(pool)  # type: ignore[arg-type]
    assert texts == ["a\nb", ""]


async def test_sse_without_a_final_event_is_truncated(serve: Callable[..., object]) -> None:
    # The last event has no blank line after it: it is dropped, and no final came.
    pool = await serve(RawServer(lambda n: sse(b"data: one\n\ndata: [DONE]")))
    with pytest.raises(TruncatedStream):
        await _read_sse(pool)  # type: ignore[arg-type]


async def test_sse_event_over_the_bound_is_a_protocol_error(
        serve: Callable[..., object], monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenwire.service.backends import _transport

    monkeypatch.setattr(_transport, "MAX_LINE_BYTES", 64)
    body = b"data: " + b"x" * 40 + b"\ndata: " + b"y" * 40 + b"\n\ndata: [DONE]\n\n"
    pool = await serve(RawServer(lambda n: sse(body)))
    with pytest.raises(ProtocolError, match="longer than 64 bytes"):
        await _read_sse(pool)  # type: ignore[arg-type]
