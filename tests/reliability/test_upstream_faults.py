"""Upstream faults: retries only when safe (before the first token, with backoff,
never past the caller's deadline) and the circuit breaker (fail fast while Ollama
is down, NOT_SERVING, recovery on its own)."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama, Fault
from tests.helpers import reason
from tests.reliability._util import generate_all, outcome, retry_delay
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _posts(fake: FakeOllama, path: str = "/api/generate") -> int:
    return sum(1 for r in fake.requests if r.method == "POST" and r.path == path)


def _post_times(fake: FakeOllama, path: str = "/api/generate") -> list[float]:
    """When each POST arrived (time.monotonic())."""
    return [r.at for r in fake.requests if r.method == "POST" and r.path == path]


async def _serve(make_runtime: MakeRuntime, **settings: Any) -> tuple[Runtime, grpc.aio.Channel]:
    runtime = await make_runtime(**settings)
    return runtime, grpc.aio.insecure_channel(runtime.target)


async def test_busy_upstream_is_retried_before_the_first_token(
        make_runtime: MakeRuntime, fake: FakeOllama, figures: dict[str, Any]) -> None:
    _, channel = await _serve(make_runtime, upstream_retries=2, retry_backoff=0.1)
    async with channel:
        stub = GenerationServiceStub(channel)
        fake.set_fault(Fault(status=503, message="server busy", times=1))
        started = time.perf_counter()
        tokens = await generate_all(stub)
        one_retry = time.perf_counter() - started
        assert tokens[-1].done and "".join(t.text for t in tokens) == "".join(fake.tokens)
        assert _posts(fake) == 2
        # Two failures: two retries, backoff 0.1 s then 0.2 s.
        fake.set_fault(Fault(status=503, message="server busy", times=2))
        started = time.perf_counter()
        assert (await generate_all(stub))[-1].done
        two_retries = time.perf_counter() - started
        assert _posts(fake) == 2 + 3
        # Three failures: out of retries, the caller gets the upstream's answer.
        fake.set_fault(Fault(status=503, message="server busy", times=3))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await generate_all(stub)
        assert failed.value.code() == UNAVAILABLE and reason(failed.value) == "UPSTREAM_BUSY"
        assert _posts(fake) == 5 + 3
    print(f"\nretries: 503 once -> OK after {one_retry * 1000:.0f} ms (2 POSTs); "
          f"503 twice -> OK after {two_retries * 1000:.0f} ms (3 POSTs); "
          "503 three times with 2 retries -> UNAVAILABLE UPSTREAM_BUSY (3 POSTs)")
    figures.setdefault("retries", {}).update({
        "503x1": {"posts": 2, "ms": round(one_retry * 1000, 1)},
        "503x2": {"posts": 3, "ms": round(two_retries * 1000, 1)},
        "503x3": {"posts": 3, "status": "UNAVAILABLE"}})


async def test_connection_dropped_before_the_first_token_is_retried(
        make_runtime: MakeRuntime, fake: FakeOllama, caplog: pytest.LogCaptureFixture) -> None:
    _, channel = await _serve(make_runtime, upstream_retries=1, retry_backoff=0.05)
    async with channel:
        fake.set_fault(Fault(drop_after=0, times=1))
        with caplog.at_level(logging.INFO, logger="tokenwire.service"):
            tokens = await generate_all(GenerationServiceStub(channel))
        assert tokens[-1].done
        assert _posts(fake) == 2
    # The log names the failure as the status and the metrics do: its ErrorInfo reason.
    [line] = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert "failed before the first token (UPSTREAM_" in line, line


async def test_no_retry_once_tokens_were_sent(make_runtime: MakeRuntime, fake: FakeOllama,
                                              figures: dict[str, Any]) -> None:
    _, channel = await _serve(make_runtime, upstream_retries=3, retry_backoff=0.01)
    async with channel:
        call = GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(model="tiny", prompt="p"), timeout=5)
        fake.set_fault(Fault(drop_after=2, times=1))
        received: list[pb.Token] = []
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for token in call:
                received.append(token)
    assert failed.value.code() == UNAVAILABLE
    assert reason(failed.value) == "UPSTREAM_DISCONNECTED"
    assert "".join(t.text for t in received) == "".join(fake.tokens[:2])  # kept, not repeated
    assert _posts(fake) == 1
    print("\ndrop after 2 tokens: UNAVAILABLE UPSTREAM_DISCONNECTED, 1 POST, "
          f"client kept {''.join(t.text for t in received)!r}")
    figures.setdefault("retries", {})["drop_after_2"] = {"posts": 1, "status": "UNAVAILABLE"}


@pytest.mark.parametrize("status", [400, 404])
async def test_request_errors_are_not_retried(make_runtime: MakeRuntime, fake: FakeOllama,
                                              status: int) -> None:
    _, channel = await _serve(make_runtime, upstream_retries=3, retry_backoff=0.01)
    async with channel:
        fake.set_fault(Fault(status=status, message="model 'tiny' not found" if status == 404
                             else "bad request", times=1))
        code = await outcome(generate_all(GenerationServiceStub(channel)))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert _posts(fake) == 1


async def test_retry_never_outlasts_the_deadline(make_runtime: MakeRuntime, fake: FakeOllama,
                                                 figures: dict[str, Any]) -> None:
    _, channel = await _serve(make_runtime, upstream_retries=5, retry_backoff=1.0)
    async with channel:
        stub = GenerationServiceStub(channel)
        fake.set_fault(Fault(status=503, message="server busy"))
        # Deadline 0.3 s, backoff drawn from [0, 1 s], then [0, 2 s] ...: whatever the
        # draws, no attempt may start after the deadline.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as short:
            await generate_all(stub, timeout=0.3)
        short_took = time.monotonic() - started
        assert short.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, UNAVAILABLE)
        assert short_took < 0.3 + 0.15
        await asyncio.sleep(1.2)  # a retry scheduled past the deadline would show up now
        short_posts = _post_times(fake)
        # (an attempt that starts just before the deadline arrives a moment later)
        assert short_posts and all(at < started + 0.3 + 0.05 for at in short_posts), (
            [round(at - started, 3) for at in short_posts])
    _, channel = await _serve(make_runtime, upstream_retries=5, retry_backoff=0.1)
    async with channel:
        # Deadline 0.5 s, backoff from [0, 0.1 s], [0, 0.2 s], [0, 0.4 s] ...: the second
        # attempt always fits; none may start after the deadline.
        before = _posts(fake)
        started = time.monotonic()
        code = await outcome(generate_all(GenerationServiceStub(channel), timeout=0.5))
        took = time.monotonic() - started
        assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, UNAVAILABLE)
        assert took < 0.5 + 0.15
        await asyncio.sleep(0.5)
        times = _post_times(fake)[before:]
        attempts = len(times)
        assert attempts >= 2
        assert all(at < started + 0.5 + 0.05 for at in times), (
            [round(at - started, 3) for at in times])
    print(f"\ndeadline 0.3 s < backoff 1 s: {short.value.code().name} after "
          f"{short_took * 1000:.0f} ms, {len(short_posts)} POST(s); deadline 0.5 s, backoff "
          f"0.1 s: {code.name} "
          f"after {took * 1000:.0f} ms, {attempts} POSTs")
    figures.setdefault("retries", {}).update({
        "deadline_0.3_backoff_1": {"status": short.value.code().name,
                                   "posts": len(short_posts),
                                   "ms": round(short_took * 1000, 1)},
        "deadline_0.5_backoff_0.1": {"status": code.name, "posts": attempts,
                                     "ms": round(took * 1000, 1)}})


# -- circuit breaker ----------------------------------------------------------------------


async def _health(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(response.status)


async def _wait_health(channel: grpc.aio.Channel, want: int, timeout: float = 5.0) -> float:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await _health(channel) != want:
        assert loop.time() - started < timeout, f"health never became {want}"
        await asyncio.sleep(0.02)
    return loop.time() - started


async def _timed(stub: GenerationServiceStub) -> tuple[float, grpc.aio.AioRpcError | None]:
    started = time.perf_counter()
    try:
        await generate_all(stub, timeout=5)
    except grpc.aio.AioRpcError as err:
        return time.perf_counter() - started, err
    return time.perf_counter() - started, None


async def test_circuit_breaker_fails_fast_and_recovers(make_runtime: MakeRuntime,
                                                       fake: FakeOllama,
                                                       figures: dict[str, Any]) -> None:
    runtime, channel = await _serve(make_runtime, breaker_threshold=3, breaker_cooldown=0.5,
                                    health_interval=0.1, upstream_retries=0)
    async with channel:
        stub = GenerationServiceStub(channel)
        assert (await generate_all(stub))[-1].done
        healthy_ms = [(await _timed(stub))[0] * 1000 for _ in range(5)]
        await fake.go_down()
        unreachable: list[float] = []
        reasons: list[str] = []
        for _ in range(50):
            took, err = await _timed(stub)
            assert err is not None and err.code() == UNAVAILABLE
            reasons.append(reason(err))
            if reasons[-1] == "CIRCUIT_OPEN":
                break
            unreachable.append(took * 1000)
        assert reasons[-1] == "CIRCUIT_OPEN", reasons
        assert set(reasons[:-1]) <= {"UPSTREAM_UNREACHABLE"}
        assert runtime.upstream.breaker.is_open
        fast: list[float] = []
        for _ in range(50):
            took, err = await _timed(stub)
            assert err is not None and reason(err) == "CIRCUIT_OPEN"
            fast.append(took * 1000)
        assert 0 < retry_delay(err) <= 0.5 + 1e-6
        await _wait_health(channel, NOT_SERVING)
        accepted = fake.connections_accepted
        await fake.come_up()
        recovered = await _wait_health(channel, SERVING)
        assert not runtime.upstream.breaker.is_open
        assert (await generate_all(stub))[-1].done
        assert fake.connections_accepted > accepted
    p50, worst = statistics.median(fast), max(fast)
    print(f"\ncircuit breaker (threshold 3, cooldown 0.5 s): {len(reasons) - 1} call(s) saw "
          f"UPSTREAM_UNREACHABLE (median {statistics.median(unreachable or [0]):.2f} ms) "
          f"before CIRCUIT_OPEN; fast-fail latency over 50 calls: median {p50:.2f} ms, "
          f"max {worst:.2f} ms (healthy call median {statistics.median(healthy_ms):.2f} ms); "
          f"SERVING again {recovered * 1000:.0f} ms after Ollama came back")
    figures["breaker"] = {
        "calls_before_open": len(reasons) - 1,
        "unreachable_ms_median": round(statistics.median(unreachable or [0]), 3),
        "fast_fail_ms_median": round(p50, 3), "fast_fail_ms_max": round(worst, 3),
        "healthy_call_ms_median": round(statistics.median(healthy_ms), 3),
        "recovered_after_come_up_ms": round(recovered * 1000, 1)}
    assert p50 < 20


async def test_circuit_opens_on_slow_failures_and_then_fails_fast(
        make_runtime: MakeRuntime, fake: FakeOllama, figures: dict[str, Any]) -> None:
    """Where the breaker pays: each failure costs 0.3 s (the connection drops
    after a wait); once open, calls fail in about a millisecond."""
    _, channel = await _serve(make_runtime, breaker_threshold=2, breaker_cooldown=30,
                                    health_interval=60, upstream_retries=0)
    async with channel:
        stub = GenerationServiceStub(channel)
        fake.set_fault(Fault(delay_first=0.3, drop_after=0))
        slow = [await _timed(stub) for _ in range(2)]
        assert all(err is not None and reason(err) == "UPSTREAM_DISCONNECTED"
                   for _, err in slow)
        fast = [await _timed(stub) for _ in range(20)]
        assert all(err is not None and reason(err) == "CIRCUIT_OPEN" for _, err in fast)
    slow_ms = statistics.median(t for t, _ in slow) * 1000
    fast_ms = statistics.median(t for t, _ in fast) * 1000
    print(f"\nslow failures: {slow_ms:.0f} ms each; after the circuit opened: "
          f"{fast_ms:.2f} ms each")
    figures.setdefault("breaker", {})["slow_failure_ms"] = round(slow_ms, 1)
    figures["breaker"]["fast_fail_after_slow_ms"] = round(fast_ms, 3)
    assert _posts(fake) == 2
    assert fast_ms < slow_ms / 10


async def _open_circuit(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    """Ollama goes away; calls fail until the circuit opens (threshold 1)."""
    await fake.go_down()
    for _ in range(3):
        _, err = await _timed(stub)
        assert err is not None and reason(err) in ("UPSTREAM_UNREACHABLE", "CIRCUIT_OPEN")
        if reason(err) == "CIRCUIT_OPEN":
            return
    raise AssertionError("the circuit did not open")


async def test_half_open_trial_call_closes_the_circuit(make_runtime: MakeRuntime,
                                                       fake: FakeOllama) -> None:
    """Without the health probe's help (long interval): after the cooldown one
    trial call goes through; its success closes the circuit."""
    runtime, channel = await _serve(make_runtime, breaker_threshold=1, breaker_cooldown=0.3,
                                    health_interval=60, upstream_retries=0)
    async with channel:
        stub = GenerationServiceStub(channel)
        await _open_circuit(stub, fake)
        await fake.come_up()
        await asyncio.sleep(0.35)
        assert (await generate_all(stub))[-1].done  # the trial
        assert not runtime.upstream.breaker.is_open
        assert (await generate_all(stub))[-1].done


async def test_abandoned_trial_call_does_not_keep_the_circuit_open(
        make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    """If the one half-open trial call is cancelled by its caller before Ollama
    answers, a later call must be allowed to be the trial; the circuit must not
    stay open until the next health probe."""
    runtime, channel = await _serve(make_runtime, breaker_threshold=1, breaker_cooldown=0.3,
                                    health_interval=60, upstream_retries=0)
    async with channel:
        stub = GenerationServiceStub(channel)
        await _open_circuit(stub, fake)
        await fake.come_up()
        await asyncio.sleep(0.35)
        fake.set_fault(Fault(delay_first=2.0, times=1))  # the trial waits for headers ...
        trial = stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"), timeout=10)
        await asyncio.sleep(0.2)
        trial.cancel()  # ... and its caller gives up.
        await fake.wait_for_disconnect()
        await asyncio.sleep(0.35)  # another cooldown
        tokens = await generate_all(stub, timeout=5)
        assert tokens[-1].done
        assert not runtime.upstream.breaker.is_open
