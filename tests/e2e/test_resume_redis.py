"""Resumable streams across replicas: two tokenwire processes sharing one real Redis
(Debian's redis-server), the test Ollama behind both."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.test_resume import Got, _read, _reason
from tests.fakeollama import FakeOllama
from tests.helpers import ServerProcess, samples, scrape, server_process, value
from tests.parts import RedisServer, haproxy, redis_server
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

WORDS = [f"w{i} " for i in range(40)]
WHOLE = "".join(WORDS)
GEN = pb.GenerateRequest(model="tiny", prompt="p", resumable=pb.Resumable())
START = pb.StartRequest(generate=pb.GenerateRequest(model="tiny", prompt="p"))


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server


def _stub(target: str) -> tuple[grpc.aio.Channel, GenerationServiceStub]:
    channel = grpc.aio.insecure_channel(target)
    return channel, GenerationServiceStub(channel)


@contextlib.asynccontextmanager
async def _pair(fake: FakeOllama, redis: RedisServer, *args: str
                ) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    async with server_process(fake.url, "--redis-url", redis.url, *args) as a, \
            server_process(fake.url, "--redis-url", redis.url, *args) as b:
        yield a, b


async def test_start_on_one_replica_resume_on_the_other(fake: FakeOllama,
                                                        redis: RedisServer) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.05  # 2 s of answer: longer than the generating replica's grace
    async with _pair(fake, redis, "--detach-grace", "0.5") as (a, b):
        ch_a, stub_a = _stub(a.target)
        ch_b, stub_b = _stub(b.target)
        async with ch_a, ch_b:
            started = await stub_a.Start(START)
            # Live, on the other replica, from the start, for longer than the grace.
            live = await _read(stub_b.Resume(pb.ResumeRequest(stream_id=started.stream_id)),
                               Got())
            assert live.text == WHOLE
            assert live.final is not None and live.final.usage.completion_tokens == len(WORDS)
            assert len(fake.streams) == 1 and fake.streams[-1].completed
            # After completion, from a position, on either replica: the same final Token.
            for stub in (stub_a, stub_b):
                tail = await _read(stub.Resume(pb.ResumeRequest(
                    stream_id=started.stream_id, after=30)), Got(next=30))
                assert tail.text == "".join(WORDS[30:])
                assert tail.final is not None and tail.final.usage == live.final.usage
            # Delivery modes on the other replica too.
            counts = []
            async for token in stub_b.Resume(pb.ResumeRequest(
                    stream_id=started.stream_id, after=10,
                    delivery=pb.Delivery(mode=pb.DELIVERY_MODE_BATCH, max_tokens=6))):
                counts.append(token.chunk_count)
            assert counts[:4] == [6, 6, 6, 6] and sum(counts) == live.next - 10
            done = await _read(stub_b.Resume(pb.ResumeRequest(
                stream_id=started.stream_id, after=live.next)), Got(next=live.next))
            assert done.final is not None and done.text == ""
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _read(stub_b.Resume(pb.ResumeRequest(
                    stream_id=started.stream_id, after=live.next + 1)), Got(next=live.next + 1))
            assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_dropped_on_one_resumed_on_the_other_each_chunk_once(
        fake: FakeOllama, redis: RedisServer) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.02
    async with _pair(fake, redis) as (a, b):
        ch_a, stub_a = _stub(a.target)
        first = await _read(stub_a.Generate(GEN), Got(), limit=8)
        await ch_a.close(grace=None)
        ch_b, stub_b = _stub(b.target)
        async with ch_b:
            rest = await _read(stub_b.Resume(pb.ResumeRequest(stream_id=first.stream_id,
                                                              after=first.next)),
                               Got(next=first.next))
        assert first.text + rest.text == WHOLE
        # Stream ids are never logged at INFO, on either replica.
        assert first.stream_id not in a.output + b.output


async def test_cancel_on_the_other_replica_stops_the_engine(fake: FakeOllama,
                                                             redis: RedisServer) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.2
    async with _pair(fake, redis) as (a, b):
        ch_a, stub_a = _stub(a.target)
        ch_b, stub_b = _stub(b.target)
        async with ch_a, ch_b:
            started = await stub_a.Start(START)
            await asyncio.sleep(0.5)
            loop = asyncio.get_running_loop()
            asked = loop.time()
            answer = await stub_b.Cancel(pb.CancelRequest(stream_id=started.stream_id))
            seen = await fake.wait_for_disconnect(timeout=3)
            assert answer.stopped
            assert seen - asked < 0.5
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _read(stub_b.Resume(pb.ResumeRequest(stream_id=started.stream_id)),
                            Got())
            assert caught.value.code() == grpc.StatusCode.CANCELLED
            assert _reason(caught.value) == "STREAM_CANCELLED"  # the same status, from Redis


async def test_generating_replica_killed_mid_stream(fake: FakeOllama,
                                                    redis: RedisServer) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.05
    async with _pair(fake, redis) as (a, b):
        ch_a, stub_a = _stub(a.target)
        ch_b, stub_b = _stub(b.target)
        async with ch_a, ch_b:
            started = await stub_a.Start(START)
            got = Got()
            reading = asyncio.create_task(_read(stub_b.Resume(
                pb.ResumeRequest(stream_id=started.stream_id)), got))
            for _ in range(200):
                if got.next >= 10:
                    break
                await asyncio.sleep(0.02)
            a.proc.send_signal(signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(reading, 15)
        # What the reader gets: every chunk the dead replica wrote, then a clear status.
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "went away" in (caught.value.details() or "")
        assert got.next >= 10 and WHOLE.startswith(got.text) and got.text != WHOLE


async def test_another_callers_id_is_not_found_on_every_replica(
        fake: FakeOllama, redis: RedisServer, tmp_path: Path) -> None:
    callers = tmp_path / "callers.toml"
    callers.write_text('[callers.alice]\ntoken = "alice-token"\n'
                       '[callers.bob]\ntoken = "bob-token"\n')
    fake.tokens = WORDS
    alice = (("authorization", "Bearer alice-token"),)
    bob = (("authorization", "Bearer bob-token"),)
    async with _pair(fake, redis, "--callers-file", str(callers)) as (a, b):
        ch_a, stub_a = _stub(a.target)
        ch_b, stub_b = _stub(b.target)
        async with ch_a, ch_b:
            started = await stub_a.Start(START, metadata=alice)
            for stub in (stub_a, stub_b):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _read(stub.Resume(pb.ResumeRequest(stream_id=started.stream_id),
                                            metadata=bob), Got())
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Cancel(pb.CancelRequest(stream_id=started.stream_id),
                                      metadata=bob)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            got = await _read(stub_b.Resume(pb.ResumeRequest(stream_id=started.stream_id),
                                            metadata=alice), Got())
            assert got.text == WHOLE


async def _resumable_health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="resumable"), timeout=5)
    return int(answer.status)


async def test_redis_stopped_and_restarted_during_streams(fake: FakeOllama,
                                                          redis: RedisServer) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.05
    async with server_process(fake.url, "--redis-url", redis.url, "--metrics-listen",
                              "127.0.0.1:0") as a, \
            server_process(fake.url, "--redis-url", redis.url) as b:
        metrics_port = await a.metrics_port()
        ch_a, stub_a = _stub(a.target)
        ch_b, stub_b = _stub(b.target)
        async with ch_a, ch_b:
            assert await _resumable_health(a.target) == health_pb2.HealthCheckResponse.SERVING
            got = Got()
            first = asyncio.create_task(_read(stub_a.Generate(GEN), got))
            for _ in range(200):
                if got.next >= 5:
                    break
                await asyncio.sleep(0.02)
            await redis.stop()
            # New resumable starts are refused, naming Redis; plain calls are served.
            for _ in range(50):
                if await _resumable_health(a.target) != health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.1)
            assert await _resumable_health(a.target) == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            found = samples((await scrape(metrics_port)).text)
            assert value(found, "tokenwire_redis_up") == 0
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub_a.Start(START)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in (refused.value.details() or "")
            plain = [t async for t in stub_a.Generate(pb.GenerateRequest(model="tiny",
                                                                         prompt="p"))]
            assert plain[-1].done
            # Redis comes back (empty): the stream in flight, which its caller kept
            # reading, is written to it again and can be resumed on the other replica.
            await redis.start()
            await asyncio.wait_for(first, 20)
            assert got.text == WHOLE and got.final is not None
            for _ in range(50):
                if await _resumable_health(a.target) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.1)
            assert await _resumable_health(a.target) == health_pb2.HealthCheckResponse.SERVING
            replay = Got()
            for _ in range(50):  # the mirror writes it again within a few heartbeats
                try:
                    replay = await _read(stub_b.Resume(pb.ResumeRequest(
                        stream_id=got.stream_id)), Got())
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND
                    await asyncio.sleep(0.2)
            assert replay.text == WHOLE
            assert replay.final is not None and replay.final.usage == got.final.usage
            again = await stub_a.Start(START)
            assert again.stream_id


async def test_workers_share_streams_through_redis(fake: FakeOllama,
                                                   redis: RedisServer) -> None:
    from tests.helpers import OWN_CONNECTION
    fake.tokens = WORDS
    async with server_process(fake.url, "--redis-url", redis.url, "--workers", "2") as server:
        ids = []
        for _ in range(6):  # each on its own connection: the kernel spreads them
            async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as ch:
                ids.append((await GenerationServiceStub(ch).Start(pb.StartRequest(
                    generate=pb.GenerateRequest(model="tiny", prompt="p")))).stream_id)
        for stream_id in ids:
            async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as ch:
                got = await _read(GenerationServiceStub(ch).Resume(
                    pb.ResumeRequest(stream_id=stream_id)), Got())
            assert got.text == WHOLE


async def test_client_resumes_on_another_replica_by_itself(fake: FakeOllama,
                                                           redis: RedisServer) -> None:
    """The connection to the replica that generates drops; the client reconnects, the
    balancer (a TCP proxy here) sends it to the other replica, which serves the rest from
    Redis while the first one goes on generating."""
    from tests.tcpproxy import tcp_proxy
    from tokenwire.client import AsyncClient
    fake.tokens = WORDS
    fake.token_delay = 0.03
    async with _pair(fake, redis) as (a, b), tcp_proxy(a.target) as proxy:
        async with AsyncClient(proxy.target) as client:
            stream = client.generate("tiny", "p", resumable=True)
            texts = []
            async for token in stream:
                texts.append(token.text)
                if len(texts) == 5:
                    proxy.retarget(b.target)
                    proxy.cut()
            assert "".join(texts) == stream.text == WHOLE
            assert stream.resumes == 1
            assert stream.completion.usage is not None
            assert stream.completion.usage.completion_tokens == len(WORDS)
    assert len(fake.streams) == 1  # one generation, on the first replica


async def test_through_haproxy_streams_resume_on_whichever_replica(
        fake: FakeOllama, redis: RedisServer, tmp_path: Path) -> None:
    """A real balancer (HAProxy, deploy/haproxy.cfg): Resumes land on both
    replicas and read streams the other one generates; the balancer killed and restarted
    mid-stream, the Python client resumes through it by itself."""
    from tokenwire.client import AsyncClient
    fake.tokens = WORDS
    fake.token_delay = 0.03
    async with _pair(fake, redis, "--health-listen", "127.0.0.1:0") as (a, b), \
            haproxy(tmp_path, [(a.target, await a.health_target()),
                               (b.target, await b.health_target())]) as lb:
        ch, stub = _stub(lb.target)
        async with ch:
            ids = [(await stub.Start(START, timeout=10)).stream_id for _ in range(4)]
            for stream_id in ids:
                got = await _read(stub.Resume(pb.ResumeRequest(stream_id=stream_id),
                                              timeout=20), Got())
                assert got.text == WHOLE
        # Both replicas served Starts and Resumes (balanced call by call).
        for replica in (a, b):
            assert "method=Start " in replica.output
            assert "method=Resume " in replica.output
        before = len(fake.streams)
        async with AsyncClient(lb.target) as client:
            stream = client.generate("tiny", "p", resumable=True)
            texts = []
            async for token in stream:
                texts.append(token.text)
                if len(texts) == 5:
                    await lb.kill()
                    await lb.start()
            assert "".join(texts) == stream.text == WHOLE
            assert stream.resumes >= 1
        assert len(fake.streams) == before + 1  # one generation, whichever replica read it


async def test_expired_id_says_so_to_its_owner_only(fake: FakeOllama, redis: RedisServer,
                                                    tmp_path: Path) -> None:
    callers = tmp_path / "callers.toml"
    callers.write_text('[callers.alice]\ntoken = "alice-token"\n'
                       '[callers.bob]\ntoken = "bob-token"\n')
    fake.tokens = ["a", "b"]
    alice = (("authorization", "Bearer alice-token"),)
    bob = (("authorization", "Bearer bob-token"),)
    async with _pair(fake, redis, "--callers-file", str(callers), "--resume-retention",
                     "0.5") as (a, b):
        ch_a, stub_a = _stub(a.target)
        ch_b, stub_b = _stub(b.target)
        async with ch_a, ch_b:
            whole = await _read(stub_a.Generate(GEN, metadata=alice), Got())
            await asyncio.sleep(1.0)  # past the retention
            messages = {}
            for who, metadata in (("alice", alice), ("bob", bob)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _read(stub_b.Resume(pb.ResumeRequest(stream_id=whole.stream_id),
                                              metadata=metadata), Got())
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                messages[who] = caught.value.details() or ""
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await _read(stub_b.Resume(pb.ResumeRequest(stream_id="Z" * 24),
                                          metadata=bob), Got())
        assert "--resume-retention" in messages["alice"]
        assert messages["bob"] == unknown.value.details()  # the id's past is not revealed
