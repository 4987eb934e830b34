"""grpcio's own weighted_round_robin (its C core) balancing by tokenwire's load reports.

Three in-process replicas, each with its own test Ollama; the last one's engine streams six
times slower. A grpcio channel to all three (an ``ipv4:`` list target, as a DNS name with
three addresses would give) calls Generate from 8 tasks back to back, with round_robin and
then weighted_round_robin in its service config. The calls each replica served are read from
its own metrics. The Go client's figures: tests/polyglot/test_wrr.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from tests.conftest import FAST, runtimes
from tests.fakeollama import FakeOllama
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

FAST_DELAY, SLOW_DELAY = 0.01, 0.06
WARMUP, MEASURE, WORKERS = 2.0, 4.0, 8


@contextlib.asynccontextmanager
async def replicas(**overrides: Any) -> AsyncIterator[list[Runtime]]:
    """Two fast replicas and a slow one (last), each with its own engine (also used by
    tests/polyglot/test_wrr.py)."""
    async with contextlib.AsyncExitStack() as stack:
        built = []
        for delay in (FAST_DELAY, FAST_DELAY, SLOW_DELAY):
            fake = await stack.enter_async_context(
                FakeOllama(models=("tiny:latest",), token_delay=delay))
            make = await stack.enter_async_context(
                runtimes(replace(FAST, ollama_url=fake.url, **overrides)))
            built.append(await make())
        yield built


def _served(replicas: list[Runtime]) -> list[float]:
    return [r.metrics.registry.get_sample_value(
        "tokenwire_rpcs_total", {"method": "Generate", "code": "OK"}) or 0.0 for r in replicas]


async def _spread(replicas: list[Runtime], policy: str) -> list[float]:
    """Generate calls each replica served in the measured window."""
    settings = {"blackoutPeriod": "1s", "weightUpdatePeriod": "0.1s"} \
        if policy == "weighted_round_robin" else {}
    config = json.dumps({"loadBalancingConfig": [{policy: settings}]})
    target = "ipv4:" + ",".join(r.target for r in replicas)
    async with grpc.aio.insecure_channel(target,
                                         options=[("grpc.service_config", config)]) as channel:
        stub = GenerationServiceStub(channel)
        end = time.monotonic() + WARMUP + MEASURE

        async def worker() -> None:
            while time.monotonic() < end:
                async for _ in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p")):
                    pass

        workers = asyncio.gather(*(worker() for _ in range(WORKERS)))
        await asyncio.sleep(WARMUP)
        before = _served(replicas)
        await workers
    return [after - b for after, b in zip(_served(replicas), before, strict=True)]


async def test_python_weighted_round_robin_reads_the_reports() -> None:
    async with replicas() as built:
        plain = await _spread(built, "round_robin")
        weighted = await _spread(built, "weighted_round_robin")
    print(f"\nserved by fast, fast, slow: round_robin {plain}, weighted {weighted}")
    assert 0.25 < plain[2] / sum(plain) < 0.42, plain
    assert weighted[2] / sum(weighted) < 0.6 * plain[2] / sum(plain), (plain, weighted)
    assert weighted[2] / sum(weighted) < 0.2, weighted


async def test_without_reports_the_weighted_policy_is_round_robin() -> None:
    """The control: with --no-load-reports the weighted policy has nothing to weigh, so
    it spreads like round robin."""
    async with replicas(load_reports=False) as built:
        weighted = await _spread(built, "weighted_round_robin")
    assert 0.25 < weighted[2] / sum(weighted) < 0.42, weighted
