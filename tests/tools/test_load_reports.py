"""Per-call load reports (ORCA): the `endpoint-load-metrics-bin` trailer of model calls.

The report is decoded from real calls' trailers, as grpcurl -v prints them: grpcio's own
client never shows this trailer to the application (its core takes it for its load
balancing policies), so a Python client cannot read it. Its figures must follow the load
(calls in flight, calls and errors per second). The meter's averages are checked on their
own with a stepped clock, where Little's law gives the exact figures a weighted round robin
client turns into weights. tests/polyglot/test_wrr.py shows grpc-go's weighted_round_robin
acting on them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama, Fault
from tokenwire.service import Runtime
from tokenwire.service.orca import TRAILER, LoadMeter
from tokenwire.service.orca.orca_load_report_pb2 import OrcaLoadReport
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

REQUEST = pb.GenerateRequest(model="tiny", prompt="p")
_BODY = '{"model": "tiny", "prompt": "p"}'


async def _grpcurl(tool_bin: Path, target: str, method: str = "Generate",
                   body: str = _BODY) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(tool_bin / "grpcurl"), "-plaintext", "-v", "-d", body, target,
        f"tokenwire.v1.GenerationService/{method}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _trailers(output: str) -> dict[str, list[str]]:
    """The trailers grpcurl -v printed (binary ones in base64)."""
    _, found, tail = output.partition("Response trailers received:\n")
    assert found, output
    trailers: dict[str, list[str]] = {}
    for line in tail.splitlines():
        key, sep, value = line.partition(": ")
        if not sep or " " in key:
            break
        trailers.setdefault(key, []).append(value)
    return trailers


def _report(output: str) -> OrcaLoadReport:
    values = _trailers(output).get(TRAILER, [])
    assert len(values) == 1, f"one {TRAILER} trailer wanted:\n{output}"
    raw = values[0]
    return OrcaLoadReport.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))


async def _generate(tool_bin: Path, target: str) -> OrcaLoadReport:
    code, out = await _grpcurl(tool_bin, target)
    assert code == 0, out
    return _report(out)


@contextlib.asynccontextmanager
async def _held(target: str, fake: FakeOllama, count: int) -> AsyncIterator[None]:
    """``count`` Generate streams that got their first token and stay in flight."""
    fake.set_fault(Fault(hang_after=1, times=count))
    async with grpc.aio.insecure_channel(target) as channel:
        calls = [GenerationServiceStub(channel).Generate(REQUEST) for _ in range(count)]
        try:
            for call in calls:
                assert (await call.read()).text
            yield
        finally:
            fake.set_fault(None)
            for call in calls:
                call.cancel()


async def test_a_model_call_ends_with_a_report(tool_bin: Path, runtime: Runtime,
                                               fake: FakeOllama) -> None:
    fake.tokens = ["a", "b", "c", "d"]
    first = await _generate(tool_bin, runtime.target)
    # its own call is the one in flight when its report is made
    assert first.named_metrics["in_flight_streams"] == 1.0
    assert first.application_utilization > 0 and first.rps_fractional > 0
    assert first.eps == 0 and first.cpu_utilization >= 0
    second = await _generate(tool_bin, runtime.target)
    assert second.rps_fractional > first.rps_fractional  # two calls in the average now
    # the first call's 4 output tokens were counted when it ended
    assert second.named_metrics["tokens_per_second"] > 0
    assert first.named_metrics["tokens_per_second"] == 0


async def test_other_methods_carry_no_report(tool_bin: Path, runtime: Runtime) -> None:
    code, out = await _grpcurl(tool_bin, runtime.target, "ListModels", "{}")
    assert code == 0, out
    assert "x-request-id" in _trailers(out) and TRAILER not in _trailers(out)


async def test_figures_rise_with_streams_in_flight(tool_bin: Path, make_runtime: MakeRuntime,
                                                  fake: FakeOllama) -> None:
    target = (await make_runtime(max_streams=64)).target
    idle = await _generate(tool_bin, target)
    async with _held(target, fake, 8):
        await asyncio.sleep(0.3)  # the average of in-flight calls follows in time
        busy = await _generate(tool_bin, target)
    after = await _generate(tool_bin, target)
    assert busy.named_metrics["in_flight_streams"] == 9.0  # 8 held and itself
    assert after.named_metrics["in_flight_streams"] == 1.0
    # 8 calls in flight for 0.3 s of a 10 s average: about 0.24 of 64; idle, a few ms of 1
    assert busy.application_utilization > 5 * idle.application_utilization
    assert busy.application_utilization > 0.1 / 64
    assert busy.rps_fractional > idle.rps_fractional


async def test_a_refused_call_carries_a_report_and_counts_as_an_error(
        tool_bin: Path, make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    target = (await make_runtime(max_streams=1)).target
    async with _held(target, fake, 1):
        code, out = await _grpcurl(tool_bin, target)
    assert code != 0 and "ResourceExhausted" in out, out
    report = _report(out)
    assert report.named_metrics["in_flight_streams"] == 2.0  # the held one and itself
    later = await _generate(tool_bin, target)
    assert report.eps == 0  # counted once it has ended, in the reports after it
    assert later.eps > 0


async def test_reports_off(tool_bin: Path, make_runtime: MakeRuntime) -> None:
    code, out = await _grpcurl(tool_bin, (await make_runtime(load_reports=False)).target)
    assert code == 0, out
    assert list(_trailers(out)) == ["x-request-id"]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_steady_load_gives_littles_law() -> None:
    """Calls arriving at 10/s that each take 0.5 s: 5 in flight on average, 10 calls/s,
    so a client's weight (rps / utilization) is capacity / 0.5 s."""
    clock = _Clock()
    meter = LoadMeter(100, horizon=2.0, clock=clock, cpu_clock=lambda: clock.now / 4)
    ends: list[float] = []
    for step in range(300):  # 30 s in steps of 0.1 s, one arrival each
        clock.now = step * 0.1
        while ends and ends[0] <= clock.now:
            ends.pop(0)
            meter.ended("OK", 20)
        meter.arrived()
        ends.append(clock.now + 0.5)
    report = OrcaLoadReport.FromString(meter.report())
    assert report.rps_fractional == pytest.approx(10, rel=0.05)
    assert report.application_utilization == pytest.approx(0.05, rel=0.1)
    assert report.rps_fractional / report.application_utilization == pytest.approx(200, rel=0.1)
    assert report.named_metrics["tokens_per_second"] == pytest.approx(200, rel=0.05)
    assert report.cpu_utilization == pytest.approx(0.25)
    assert report.eps == 0
    assert report.named_metrics["in_flight_streams"] == meter.in_flight == 5


def test_errors_per_second_count_server_faults_only() -> None:
    clock = _Clock()
    meter = LoadMeter(10, horizon=2.0, clock=clock)
    for step in range(200):
        clock.now = step * 0.1
        meter.arrived()
        meter.ended("UNAVAILABLE" if step % 2 else "INVALID_ARGUMENT", 0)
    report = OrcaLoadReport.FromString(meter.report())
    assert report.eps == pytest.approx(5, rel=0.1)
    assert report.rps_fractional == pytest.approx(10, rel=0.1)
    # the averages forget: 10 horizons later, little is left
    clock.now += 20
    assert OrcaLoadReport.FromString(meter.report()).rps_fractional < 0.001
