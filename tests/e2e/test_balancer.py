"""A real gRPC load balancer: HAProxy (Debian's) running deploy/haproxy.cfg, the file users
copy, in front of three tokenwire processes that share one real redis-server, the test
Ollama behind them all. Calls spread; a replica drained with SIGTERM loses no stream and
takes no new call; a replica killed with SIGKILL loses only its own streams, and resumable
streams that were read through it resume on another replica through the balancer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tests.helpers import ServerProcess, server_process
from tests.parts import (
    HAPROXY_CFG,
    Haproxy,
    RedisServer,
    haproxy,
    health_check_bytes,
    redis_server,
)
from tokenwire.client import AsyncClient, AsyncTokenStream, Unavailable
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

WORDS = [f"w{i} " for i in range(40)]
WHOLE = "".join(WORDS)


def _rid() -> str:
    return f"lb-{os.urandom(5).hex()}"


def _request(max_tokens: int | None = None) -> pb.GenerateRequest:
    options = pb.Options(max_tokens=max_tokens) if max_tokens is not None else None
    return pb.GenerateRequest(model="tiny", prompt="p", options=options)


@contextlib.asynccontextmanager
async def _cluster(fake: FakeOllama, workdir: Path, *args: str
                   ) -> AsyncIterator[tuple[list[ServerProcess], Haproxy, RedisServer]]:
    """Three replicas on one Redis, each with a --health-listen port, behind HAProxy."""
    async with redis_server(workdir) as redis, contextlib.AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(server_process(
            fake.url, "--redis-url", redis.url, "--health-listen", "127.0.0.1:0", *args))
            for _ in range(3)]
        backends = [(r.target, await r.health_target()) for r in replicas]
        async with haproxy(workdir, backends) as lb:
            yield replicas, lb, redis


async def _served_by(replicas: list[ServerProcess], rid: str) -> int:
    """The index of the replica whose access log has the call ``rid``."""
    for _ in range(200):
        found = [i for i, r in enumerate(replicas) if f"rid={rid} " in r.output]
        if found:
            assert len(found) == 1
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no replica logged {rid}")


async def _read(stub: GenerationServiceStub, request: pb.GenerateRequest, rid: str,
                got: list[str]) -> None:
    async for token in stub.Generate(request, timeout=30, metadata=(("x-request-id", rid),)):
        got.append(token.text)


async def _when(event: Awaitable[None]) -> float:
    """The loop time at which ``event`` happened."""
    await event
    return asyncio.get_running_loop().time()


async def _until(what: str, check: Callable[[], object]) -> None:
    """Polls ``check()`` until it is true (15 s at most)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_the_health_check_bytes_in_the_config_are_the_recipe() -> None:
    """deploy/haproxy.cfg's raw HTTP/2 health check is the one tests/parts.py builds."""
    assert f"send-binary {health_check_bytes().hex()}\n" in HAPROXY_CFG.read_text()


async def test_drain_delay_serves_new_calls_while_not_serving(
        make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    """In process: for --drain-delay after stop begins, readiness is NOT_SERVING and new
    calls are still served; the stop takes that long, and no longer than the grace."""
    fake.tokens = ["a", "b"]
    runtime = await make_runtime(health_listen="127.0.0.1:0", drain_delay=0.6,
                                 shutdown_grace=5.0)
    assert runtime.health_target is not None
    async with grpc.aio.insecure_channel(runtime.health_target) as probe, \
            grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.create_task(_when(runtime.stop()))
        await asyncio.sleep(0.1)
        answer = await health_pb2_grpc.HealthStub(probe).Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        got: list[str] = []
        await _read(stub, _request(), _rid(), got)
        assert "".join(got) == "ab"
        assert not stopping.done()
        assert 0.6 <= await stopping - began < 3.0
    # A delay longer than the grace is cut to it.
    runtime = await make_runtime(drain_delay=30.0, shutdown_grace=0.3)
    began = loop.time()
    await runtime.stop()
    assert loop.time() - began < 3.0


async def test_calls_spread_over_the_replicas(fake: FakeOllama, tmp_path: Path) -> None:
    fake.tokens = WORDS
    async with _cluster(fake, tmp_path) as (replicas, lb, _):
        # One client connection: HAProxy balances each call, not the connection.
        async with grpc.aio.insecure_channel(lb.target) as channel:
            stub = GenerationServiceStub(channel)
            rids = [_rid() for _ in range(30)]
            for rid in rids:
                got: list[str] = []
                await _read(stub, _request(max_tokens=2), rid, got)
                assert "".join(got) == "w0 w1 "
            served = [await _served_by(replicas, rid) for rid in rids]
            assert sorted(served.count(i) for i in range(3)) == [10, 10, 10], served
            # Long streams at once: each replica runs a third of them (fewest running first).
            fake.token_delay = 0.03
            texts: list[list[str]] = [[] for _ in range(12)]
            reading = [asyncio.create_task(_read(stub, _request(), _rid(), got))
                       for got in texts]
            await _until("every stream to start", lambda: all(len(t) >= 2 for t in texts))
            running = await lb.servers()
            assert [int(running[f"r{i}"]["scur"]) for i in (1, 2, 3)] == [4, 4, 4]
            await asyncio.gather(*reading)
            assert all("".join(t) == WHOLE for t in texts)
        sent = await lb.servers()
        assert sum(int(sent[f"r{i}"]["stot"]) for i in (1, 2, 3)) == 42


async def test_drained_replica_finishes_its_streams_and_takes_no_new_call(
        fake: FakeOllama, tmp_path: Path) -> None:
    """SIGTERM with --drain-delay 2 (what deploy/haproxy.cfg's checks need): the streams it
    runs finish inside the grace; HAProxy takes it out within its check interval; every
    call made meanwhile succeeds, and none after that reaches it."""
    fake.tokens = WORDS
    fake.token_delay = 0.05  # 2 s a stream
    async with _cluster(fake, tmp_path, "--shutdown-grace", "20", "--drain-delay", "2"
                        ) as (replicas, lb, _), \
            grpc.aio.insecure_channel(lb.target) as channel:
        stub = GenerationServiceStub(channel)
        rids = [_rid() for _ in range(6)]
        texts: list[list[str]] = [[] for _ in rids]
        running = [asyncio.create_task(_read(stub, _request(), rid, got))
                   for rid, got in zip(rids, texts, strict=True)]
        await _until("every stream to start", lambda: all(len(t) >= 3 for t in texts))
        assert [int(s["scur"]) for s in (await lb.servers()).values()] == [2, 2, 2]
        victim = replicas[0]
        victim.proc.send_signal(signal.SIGTERM)
        await victim.wait_for("shutting down")
        loop = asyncio.get_running_loop()
        drained_at = loop.time()
        before: list[tuple[str, list[str], asyncio.Task[None]]] = []
        after: list[tuple[str, list[str], asyncio.Task[None]]] = []
        down = asyncio.create_task(_when(lb.wait_status("r1", "DOWN")))
        for _ in range(12):  # 3 s of new calls, 3 every 0.25 s
            batch = after if down.done() else before
            for _ in range(3):
                rid, got = _rid(), []
                batch.append((rid, got, asyncio.create_task(
                    _read(stub, _request(max_tokens=3), rid, got))))
            await asyncio.sleep(0.25)
        await down
        await asyncio.gather(*running, *(task for _, _, task in before + after))
        assert await victim.exited() == 0
        # Every stream it had finished whole, inside its grace.
        assert all("".join(t) == WHOLE for t in texts)
        mine = [rid for rid in rids if f"rid={rid} " in victim.output]
        assert len(mine) == 2
        assert all(f"rid={rid} caller=peer:127.0.0.1 outcome=OK" in victim.output
                   for rid in mine)
        # Every new call succeeded; once HAProxy had it DOWN, none reached it.
        assert before and after
        assert all("".join(got) == "w0 w1 w2 " for _, got, _ in before + after)
        for rid, _, _ in after:
            assert await _served_by(replicas, rid) in (1, 2)
        assert down.result() - drained_at < 2.0  # HAProxy noticed inside the drain delay


async def test_killed_replica_loses_only_its_own_streams(fake: FakeOllama,
                                                         tmp_path: Path) -> None:
    """SIGKILL: the plain streams it served fail (after the tokens they had); every other
    stream finishes; resumable streams generated elsewhere that were read through it
    resume on another replica through the balancer, each chunk once."""
    fake.tokens = WORDS
    fake.token_delay = 0.1  # 4 s a stream
    async with _cluster(fake, tmp_path) as (replicas, lb, _):
        victim, others = replicas[0], replicas[1:]
        # Resumable streams generated on the two others...
        ids = []
        for replica in others:
            async with AsyncClient(replica.target) as direct:
                ids += [await direct.start("tiny", "p") for _ in range(2)]
        async with AsyncClient(lb.target) as client, \
                grpc.aio.insecure_channel(lb.target) as channel:
            # ... read through the balancer while only r1 (the victim) takes calls.
            for name in ("r2", "r3"):
                await lb.command(f"set server tokenwire/{name} state drain")
            readers = [client.resume(stream_id) for stream_id in ids]
            plain_rid, plain_got = _rid(), []
            stub = GenerationServiceStub(channel)
            plain_on_victim = asyncio.create_task(
                _read(stub, _request(), plain_rid, plain_got))
            reading = [asyncio.create_task(_drain(stream)) for stream in readers]
            await _until("the readers to start",
                         lambda: all(len(s.text) >= 6 for s in readers) and plain_got)
            for name in ("r2", "r3"):
                await lb.command(f"set server tokenwire/{name} state ready")
            # Plain streams now go to the others (fewest running: r1 has 5).
            others_got: list[list[str]] = [[], []]
            others_rids = [_rid(), _rid()]
            plain_elsewhere = [asyncio.create_task(_read(stub, _request(), rid, got))
                               for rid, got in zip(others_rids, others_got, strict=True)]
            await _until("the other plain streams to start",
                         lambda: all(len(g) >= 2 for g in others_got))
            assert int((await lb.servers())["r1"]["scur"]) == 5
            await victim.stop(signal.SIGKILL)
            # Its own plain stream: the tokens it had, then an error. HAProxy ends the
            # client's stream with no gRPC status at all (UNKNOWN, "Stream removed").
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await plain_on_victim
            assert caught.value.code() == grpc.StatusCode.UNKNOWN
            assert "Stream removed" in (caught.value.details() or "")
            assert 0 < len(plain_got) < len(WORDS) and WHOLE.startswith("".join(plain_got))
            # Everyone else's: whole.
            await asyncio.gather(*plain_elsewhere, *reading)
            assert all("".join(got) == WHOLE for got in others_got)
            for stream in readers:
                assert stream.text == WHOLE and stream.final is not None
                assert stream.resumes == 1
            for rid in others_rids:
                assert await _served_by(replicas, rid) in (1, 2)
            # New calls keep coming through, to the two left.
            await lb.wait_status("r1", "DOWN")
            for _ in range(4):
                stream = client.generate("tiny", "p", options={"max_tokens": 2})
                await _drain(stream)
                assert stream.text == "w0 w1 "


async def _drain(stream: AsyncTokenStream) -> None:
    async for _ in stream:
        pass


async def test_a_stream_past_the_grace_ends_unavailable_with_its_tokens(
        fake: FakeOllama, tmp_path: Path) -> None:
    """Draining is bounded: a stream longer than --shutdown-grace ends UNAVAILABLE
    (SHUTTING_DOWN) after the tokens it had, through the balancer too; a resumable one
    read with the client ends the same way, with every chunk the replica produced."""
    fake.tokens = WORDS
    fake.token_delay = 0.1
    async with _cluster(fake, tmp_path, "--shutdown-grace", "0.5") as (replicas, lb, _), \
            AsyncClient(lb.target) as client, \
            grpc.aio.insecure_channel(lb.target) as channel:
        for name in ("r2", "r3"):  # both calls to r1
            await lb.command(f"set server tokenwire/{name} state drain")
        plain: list[str] = []
        reading = asyncio.create_task(_read(GenerationServiceStub(channel), _request(),
                                            _rid(), plain))
        kept = client.generate("tiny", "p", resumable=True)
        keeping = asyncio.create_task(_drain(kept))
        await _until("both streams to start", lambda: len(plain) >= 3 and len(kept.text) > 9)
        replicas[0].proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reading
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (caught.value.details() or "").lower()
        assert WHOLE.startswith("".join(plain)) and len(plain) < len(WORDS)
        with pytest.raises(Unavailable) as ended:
            await keeping
        assert "shutting down" in str(ended.value).lower()
        assert WHOLE.startswith(kept.text) and len(kept.text) < len(WHOLE)
