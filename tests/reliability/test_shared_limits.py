"""Limits and token budgets shared by replicas: three tokenwire processes on one real
Redis (Debian's redis-server), one caller spread over all of them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fakeollama import FakeOllama
from tests.helpers import ServerProcess, reason, samples, scrape, server_process, value
from tests.parts import RedisServer, redis_server
from tests.reliability._util import bearer
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

ALICE, BOB = bearer("tok-alice"), bearer("tok-bob")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server


class Replicas:
    def __init__(self, procs: list[ServerProcess]) -> None:
        self.procs = procs
        self.channels = [grpc.aio.insecure_channel(p.target) for p in procs]
        self.stubs = [GenerationServiceStub(c) for c in self.channels]
        self._turn = itertools.cycle(range(len(procs)))

    def next(self) -> GenerationServiceStub:
        """The replicas in turn: one caller spread over all of them."""
        return self.stubs[next(self._turn)]

    async def health(self, name: str) -> list[int]:
        out = []
        for channel in self.channels:
            stub = health_pb2_grpc.HealthStub(channel)
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=name),
                                      metadata=ALICE, timeout=5)
            out.append(answer.status)
        return out

    async def aclose(self) -> None:
        for channel in self.channels:
            await channel.close()


@contextlib.asynccontextmanager
async def replicas(fake: FakeOllama, redis: RedisServer, tmp_path: Path, callers: str,
                   *args: str, n: int = 3) -> AsyncIterator[Replicas]:
    path = tmp_path / "callers.toml"
    path.write_text(callers)
    async with contextlib.AsyncExitStack() as stack:
        procs = [await stack.enter_async_context(server_process(
            fake.url, "--redis-url", redis.url, "--callers-file", str(path),
            "--metrics-listen", "127.0.0.1:0", *args)) for _ in range(n)]
        group = Replicas(procs)
        try:
            yield group
        finally:
            await group.aclose()


async def _code(call: Any) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _generate(max_tokens: int = 10, prompt: str = "p") -> pb.GenerateRequest:
    request = pb.GenerateRequest(model="tiny", prompt=prompt)
    request.options.max_tokens = max_tokens
    return request


async def test_one_callers_rate_holds_across_three_replicas(
        fake: FakeOllama, redis: RedisServer, tmp_path: Path, figures: dict[str, Any]) -> None:
    """25 requests/s, burst 5, for 4 s, requested as fast as 6 callers can over three
    replicas: what gets through is the burst plus 25 a second, within 5 % (each replica
    by itself would let three times as many through)."""
    rate, burst, seconds = 25.0, 5, 4.0
    async with replicas(fake, redis, tmp_path, '[callers.alice]\ntoken = "tok-alice"\n'
                        f"rate = {rate}\nburst = {burst}\n") as group:
        admitted = refused = 0
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def hammer() -> None:
            nonlocal admitted, refused
            while loop.time() - start < seconds:
                try:
                    await group.next().ListModels(pb.ListModelsRequest(), metadata=ALICE,
                                                  timeout=5)
                    admitted += 1
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                    refused += 1

        await asyncio.gather(*(hammer() for _ in range(6)))
        took = loop.time() - start
    expected = burst + rate * took
    print(f"\nrate {rate:g}/s burst {burst} over 3 replicas for {took:.2f} s: {admitted} "
          f"admitted (expected {expected:.1f}), {refused} refused")
    figures.setdefault("shared limits", {})["rate"] = {
        "admitted": admitted, "expected": round(expected, 1), "refused": refused}
    assert refused > admitted  # it was pushed well past the limit
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, expected)


async def test_concurrency_per_caller_and_in_all_holds_across_three_replicas(
        fake: FakeOllama, redis: RedisServer, tmp_path: Path) -> None:
    fake.tokens = [f"w{i} " for i in range(40)]
    fake.token_delay = 0.05  # 2 s streams: all of them overlap
    callers = ('[callers.alice]\ntoken = "tok-alice"\nmax_streams = 8\n'
               '[callers.bob]\ntoken = "tok-bob"\n')
    async with replicas(fake, redis, tmp_path, callers, "--max-streams", "12") as group:
        alice = [asyncio.create_task(_code(group.next().Generate(
            _generate(40), metadata=ALICE, timeout=20))) for _ in range(24)]
        await asyncio.sleep(0.8)
        assert fake.active_streams == 8  # alice's 8, wherever they landed
        bob = [asyncio.create_task(_code(group.next().Generate(
            _generate(40), metadata=BOB, timeout=20))) for _ in range(12)]
        await asyncio.sleep(0.5)
        assert fake.active_streams == 12  # --max-streams counts in all, over the replicas
        codes = await asyncio.gather(*alice, *bob)
    ok = codes[:24].count(grpc.StatusCode.OK), codes[24:].count(grpc.StatusCode.OK)
    assert ok == (8, 4), codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_two_hundred_parallel_calls_overshoot_a_budget_by_at_most_one_reservation(
        fake: FakeOllama, redis: RedisServer, tmp_path: Path, figures: dict[str, Any]) -> None:
    fake.tokens = [f"w{i} " for i in range(40)]
    fake.token_delay = 0.005
    budget = 4000
    async with replicas(fake, redis, tmp_path, '[callers.alice]\ntoken = "tok-alice"\n'
                        f"tokens_per_day = {budget}\n") as group:
        used = 0
        codes: list[grpc.StatusCode] = []

        async def one(stub: GenerationServiceStub) -> None:
            nonlocal used
            try:
                async for token in stub.Generate(_generate(40), metadata=ALICE, timeout=30):
                    if token.done:
                        used += token.usage.prompt_tokens + token.usage.completion_tokens
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as err:
                assert reason(err) == "TOKEN_BUDGET_EXHAUSTED", err
                codes.append(err.code())

        await asyncio.gather(*(one(group.next()) for _ in range(200)))
        first = codes.count(grpc.StatusCode.OK)
        # What the first wave reserved but did not use came back: calls one at a time
        # spend it, down to less than one reservation.
        for _ in range(20):
            await one(group.next())
        found = samples((await scrape(await group.procs[0].metrics_port())).text)
    reservation = 40 + 5  # the output cap and the prompt's estimate (a few tokens)
    ok = codes.count(grpc.StatusCode.OK)
    print(f"\n200 parallel calls over 3 replicas, {budget} tokens a day: {first} served, "
          f"{200 - first} refused; 20 more: {ok - first} served; {used} tokens used")
    figures.setdefault("shared limits", {})["budget"] = {
        "served": first, "refused": 200 - first, "second_wave_served": ok - first,
        "used": used, "budget": budget}
    assert first >= budget // reservation  # no reservation was refused that fitted
    assert ok > first
    assert used <= budget + reservation, used
    assert budget - used < reservation, used  # spent down to less than one call's worth
    assert value(found, "tokenwire_budget_refusals_total", window="day") > 0


async def test_redis_killed_and_restarted_mid_test(
        fake: FakeOllama, redis: RedisServer, tmp_path: Path) -> None:
    """Redis goes away: budgeted calls are refused at once (closed), others are limited
    per replica (local), streams in flight go on, health and metrics say so; Redis comes
    back empty: the running calls' leases are written again, budgets are checked again."""
    fake.tokens = [f"w{i} " for i in range(160)]
    fake.token_delay = 0.05  # 8 s: the two held streams outlive the outage
    callers = ('[callers.alice]\ntoken = "tok-alice"\ntokens_per_minute = 100000\n'
               '[callers.bob]\ntoken = "tok-bob"\nmax_streams = 2\n')
    async with replicas(fake, redis, tmp_path, callers, "--redis-lease-ttl", "1.5") as group:
        assert await group.health("limits") == [SERVING] * 3
        running = [asyncio.create_task(_code(group.stubs[i].Generate(
            _generate(160), metadata=BOB, timeout=30))) for i in (0, 1)]
        await asyncio.sleep(0.3)
        assert await _code(group.stubs[2].Generate(_generate(), metadata=BOB)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        await redis.stop()
        loop = asyncio.get_running_loop()
        took = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in group.stubs[0].Generate(_generate(), metadata=ALICE, timeout=5):
                pass
        took = loop.time() - took
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(caught.value) == "LIMITS_STORE_UNAVAILABLE"
        assert "--redis-down-budgets closed" in (caught.value.details() or "")
        assert took < 1.0, took  # never a hang
        for _ in range(40):
            if await group.health("limits") == [NOT_SERVING] * 3:
                break
            await asyncio.sleep(0.1)
        assert await group.health("limits") == [NOT_SERVING] * 3
        assert await group.health("") == [SERVING] * 3  # the gateway itself still serves
        found = samples((await scrape(await group.procs[2].metrics_port())).text)
        assert value(found, "tokenwire_limits_shared") == 0
        # Bob (no budget) is served, under this replica's own limits meanwhile.
        assert await _code(group.stubs[2].Generate(_generate(), metadata=BOB)) == \
            grpc.StatusCode.OK
        await redis.start()  # same port, no data
        for _ in range(50):
            if await group.health("limits") == [SERVING] * 3:
                break
            await asyncio.sleep(0.1)
        assert await group.health("limits") == [SERVING] * 3
        await asyncio.sleep(1.0)  # a refresh: the two running calls are counted again
        assert not any(task.done() for task in running)
        assert await _code(group.stubs[2].Generate(_generate(), metadata=BOB)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _code(group.stubs[1].Generate(_generate(), metadata=ALICE)) == \
            grpc.StatusCode.OK
        assert await asyncio.gather(*running) == [grpc.StatusCode.OK] * 2


async def test_the_calls_of_a_replica_that_died_stop_counting(
        fake: FakeOllama, redis: RedisServer, tmp_path: Path) -> None:
    fake.tokens = [f"w{i} " for i in range(200)]
    fake.token_delay = 0.05
    async with replicas(fake, redis, tmp_path, '[callers.bob]\ntoken = "tok-bob"\n'
                        'max_streams = 2\n', "--redis-lease-ttl", "1.5", n=2) as group:
        held = [asyncio.create_task(_code(group.stubs[0].Generate(
            _generate(200), metadata=BOB, timeout=30))) for _ in range(2)]
        await asyncio.sleep(0.3)
        assert await _code(group.stubs[1].Generate(_generate(), metadata=BOB)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.sleep(2.0)  # past the lease TTL: the live replica keeps them fresh
        assert await _code(group.stubs[1].Generate(_generate(), metadata=BOB)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        group.procs[0].proc.kill()
        died = time.monotonic()
        while await _code(group.stubs[1].Generate(_generate(), metadata=BOB)) != \
                grpc.StatusCode.OK:
            assert time.monotonic() - died < 3.0
            await asyncio.sleep(0.1)
        assert time.monotonic() - died <= 1.5 + 0.5
        for task in held:
            assert await task == grpc.StatusCode.UNAVAILABLE
