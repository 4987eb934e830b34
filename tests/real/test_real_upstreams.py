"""Two real Ollama processes behind one gateway (``--upstreams-file``): routing by model,
least-loaded spread, one upstream killed mid-run (calls before their first token fail
over; calls mid-stream end UNAVAILABLE with their tokens kept; it rejoins once
restarted) and one hung (SIGSTOP: the kernel still accepts its connections, nothing
answers; its failover_timeout passes, then the call moves on).

``main`` is the tier's shared Ollama (never stopped here); ``spare`` is a second one
started for this module, which the tests stop, kill and restart. Both read the same
models directory (scripts/ollama-dev registers smollm2:135m there), so "one upstream
lacks the model" is said by the configuration: an alias only ``main`` serves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.conftest import runtimes
from tests.helpers import reason
from tests.real.conftest import (
    MODEL,
    OLLAMA_DEV,
    REAL,
    RealOllama,
    shower,
    started_ollama,
)
from tests.real.test_real_ollama import greedy, receive
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

pytestmark = pytest.mark.real

SHORT = greedy(8)


@pytest.fixture(scope="module")
def spare(request: pytest.FixtureRequest) -> Iterator[RealOllama]:
    """A second real Ollama on its own port (stopped on exit, whatever state it is in)."""
    with started_ollama(shower(request)) as real:
        yield real


def _upstreams(path: Path, main: RealOllama, spare: RealOllama, *, spare_first: bool = False,
               slots: int = 2, failover_timeout: float = 60.0,
               main_failover_timeout: float = 300.0) -> Path:
    """main discovers its models; spare serves smollm2:135m; "smol-main" is an alias only
    main serves. With ``spare_first``, spare is the preferred tier (main the fallback).
    Each takes two calls (``slots``) while Ollama runs one at a time
    (OLLAMA_NUM_PARALLEL=1): the second waits without a token, so ``failover_timeout``
    must outlast the first's answer except where a test wants it short: two runners on
    two cores slow each other down a lot (a 40-token answer once took 33 s in CI), so main's
    is long by default too."""
    path.write_text(
        f'[upstreams.main]\nkind = "ollama"\nurl = "{main.url}"\ndiscover = true\n'
        f"slots = {slots}\npriority = {1 if spare_first else 0}\n"
        f"failover_timeout = {main_failover_timeout}\n\n"
        f'[upstreams.spare]\nkind = "ollama"\nurl = "{spare.url}"\nmodels = ["{MODEL}"]\n'
        f"slots = {slots}\npriority = 0\nfailover_timeout = {failover_timeout}\n\n"
        f'[aliases]\n"smol-main" = [{{upstream = "main", model = "{MODEL}"}}]\n')
    return path


@contextlib.asynccontextmanager
async def gateway(path: Path, **overrides: Any) -> AsyncIterator[tuple[Runtime,
                                                                      GenerationServiceStub]]:
    async with runtimes(replace(REAL, upstreams_file=str(path), breaker_threshold=0,
                                upstream_retries=0, **overrides)) as make:
        runtime = await make()
        async with grpc.aio.insecure_channel(runtime.target) as channel:
            yield runtime, GenerationServiceStub(channel)


def _request(options: pb.Options = SHORT, model: str = MODEL,
             prompt: str = "Name a colour.") -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, prompt=prompt, options=options)


async def _warm(*reals: RealOllama) -> None:
    """Loads the model in each Ollama (a load request: no prompt), so that a cold load
    does not blur the timings below."""
    async with httpx.AsyncClient(timeout=180) as http:
        for real in reals:
            loaded = await http.post(real.url + "/api/generate", json={"model": MODEL})
            assert loaded.status_code == 200, loaded.text


def _group(real: RealOllama, sig: int) -> None:
    """Sends ``sig`` to the server and its runners (ollama-dev starts it with setsid)."""
    os.killpg(real.pid, sig)


async def test_routing_by_model_and_a_least_loaded_spread(
        tmp_path: Path, real_ollama: RealOllama, spare: RealOllama,
        figures: dict[str, str]) -> None:
    # Two runners on two cores slow each other down so much (a 40-token answer took 33 s and
    # 60 s in CI) that a call queued behind another could reach even a long failover_timeout
    # and move: here no call may move, routing alone must spread them.
    path = _upstreams(tmp_path / "upstreams.toml", real_ollama, spare, failover_timeout=600.0,
                      main_failover_timeout=600.0)
    async with gateway(path) as (runtime, stub):
        await _warm(real_ollama, spare)
        await runtime.health.check_once()  # both have the model loaded now (/api/ps)
        assert runtime.router.upstream("spare").loaded
        for _ in range(3):  # only main serves the alias, however busy it is
            got = await receive(stub.Generate(_request(model="smol-main"), timeout=120))
            assert got.tokens[-1].usage.upstream == "main"
            assert got.tokens[-1].model == "smol-main"
        # Long enough (12 tokens each) that all four are routed while the first ones still
        # run: routing happens as each call starts, all four within milliseconds.
        answers = await asyncio.gather(*(receive(stub.Generate(_request(greedy(12)), timeout=600))
                                         for _ in range(4)))
    spread = Counter(got.tokens[-1].usage.upstream for got in answers)
    assert spread == {"main": 2, "spare": 2}, spread
    assert all(got.tokens[-1].usage.attempts == 1 for got in answers)
    figures["real 2 upstreams, 4 streams"] = ", ".join(f"{k} {v}" for k, v in sorted(
        spread.items()))


async def test_a_hung_upstream_is_left_after_its_failover_timeout(
        tmp_path: Path, real_ollama: RealOllama, spare: RealOllama,
        figures: dict[str, str]) -> None:
    path = _upstreams(tmp_path / "upstreams.toml", real_ollama, spare, spare_first=True,
                      failover_timeout=3.0)
    # One probe, at start: spare stops after it said spare was up.
    async with gateway(path, health_interval=3600.0) as (runtime, stub):
        await _warm(real_ollama, spare)
        _group(spare, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            got = await receive(stub.Generate(_request(), timeout=120))
            took = loop.time() - started
            final = got.tokens[-1]
            assert (final.usage.upstream, final.usage.attempts) == ("main", 2)
            assert final.done and "".join(t.text for t in got.tokens)
            assert 3.0 <= took < 60.0, took
            assert runtime.router.upstream("spare").suspect  # passed over meanwhile
            again = await receive(stub.Generate(_request(), timeout=120))
            assert again.tokens[-1].usage.attempts == 1
            assert again.tokens[-1].usage.upstream == "main"
        finally:
            _group(spare, signal.SIGCONT)
        await runtime.health.check_once()  # answers again: no longer passed over
        assert not runtime.router.upstream("spare").suspect
        back = await receive(stub.Generate(_request(), timeout=120))
        assert back.tokens[-1].usage.upstream == "spare"
    figures["real hung upstream (SIGSTOP)"] = (f"first token via main after {took:.1f} s "
                                               "(failover_timeout 3 s)")


async def test_a_killed_upstream_fails_over_calls_before_their_first_token_and_rejoins(
        tmp_path: Path, real_ollama: RealOllama, spare: RealOllama,
        figures: dict[str, str]) -> None:
    path = _upstreams(tmp_path / "upstreams.toml", real_ollama, spare, spare_first=True)
    long = _request(greedy(400), prompt="Write a long story about a lighthouse keeper.")
    async with gateway(path, health_interval=3600.0) as (runtime, stub):
        await _warm(real_ollama, spare)
        # Two calls fill spare's two slots; with OLLAMA_NUM_PARALLEL=1 it streams the
        # first and holds the second before its first token. A third goes to main.
        streaming = stub.Generate(long, timeout=180)
        first = await streaming.read()
        assert isinstance(first, pb.Token) and first.text
        waiting = asyncio.create_task(receive(stub.Generate(long, timeout=180)))
        for _ in range(1500):  # until spare has both (30 s at most)
            if runtime.router.upstream("spare").in_flight == 2:
                break
            await asyncio.sleep(0.02)
        assert runtime.router.upstream("spare").in_flight == 2
        third = asyncio.create_task(receive(stub.Generate(_request(), timeout=180)))
        received = [first]
        while len(received) < 3:
            token = await streaming.read()
            assert isinstance(token, pb.Token)
            received.append(token)
        _group(spare, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as dropped:
            while isinstance(token := await streaming.read(), pb.Token):
                received.append(token)
        assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(dropped.value) == "UPSTREAM_DISCONNECTED"
        assert len(received) >= 2 and not any(t.done for t in received)  # tokens kept
        moved = (await waiting).tokens[-1]
        assert moved.done and (moved.usage.upstream, moved.usage.attempts) == ("main", 2)
        assert (await third).tokens[-1].usage.upstream == "main"

        # Restarted on the same port: the next probe sees it, and it serves again.
        restart = await asyncio.create_subprocess_exec(
            str(OLLAMA_DEV), "start", "--port", str(spare.port),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(restart.communicate(), 300)
        assert restart.returncode == 0, err.decode()  # the module fixture stops it again
        await runtime.health.check_once()
        assert runtime.router.upstream("spare").up
        back = await receive(stub.Generate(_request(), timeout=180))
        assert back.tokens[-1].usage.upstream == "spare"
    figures["real killed upstream"] = (f"mid-stream call UNAVAILABLE after {len(received)} "
                                       "tokens; waiting call served by main in 2 attempts; "
                                       "rejoined after restart")
