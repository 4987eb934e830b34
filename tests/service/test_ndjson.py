"""The lean NDJSON client against a raw loopback server that writes exact bytes:
framing split anywhere, length and chunked bodies, errors, EOF, keep-alive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from tokenwire.service import ProtocolError, TruncatedStream, UpstreamDisconnected
from tokenwire.service.backends._transport import NDJSONPool
from tokenwire.service.backends.ollama._answers import generate_event

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
    pools: list[NDJSONPool] = []

    async def start(raw: RawServer) -> NDJSONPool:
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        pool = NDJSONPool(f"http://127.0.0.1:{port}", connect_timeout=2, max_connections=4)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def _read(pool: NDJSONPool) -> list[dict[str, object]]:
    response = await pool.open("/api/generate", b'{"model":"m"}', generate_event)
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
    pool: NDJSONPool = await serve(RawServer(  # type: ignore[assignment]
        lambda n: b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(error), error),
        step=5))
    response = await pool.open("/api/generate", b"{}", generate_event)
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
    pool: NDJSONPool = await serve(raw)  # type: ignore[assignment]

    async def one() -> list[object]:
        got: list[object] = []

        def sink(chunk: dict[str, object], size: int) -> bool:
            got.append(chunk[0])
            return True

        response = await pool.open("/api/generate", b"{}", generate_event)
        try:
            await response.deliver(sink)
        finally:
            pool.release(response)
        return got

    for _ in range(3):
        assert await asyncio.wait_for(one(), 5) == ["a"] * 5 + [""]
    assert raw.connections == 1
