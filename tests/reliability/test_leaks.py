"""No leaks: a storm of streams cancelled at random points (before Ollama's
headers, mid-stream, at the last token, by deadline) leaves no upstream
connection streaming, no admission slot taken, and the counts of asyncio tasks
and file descriptors back at their baseline."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama, Fault
from tokenwire.service import Runtime
from tokenwire.service import _server as server_module
from tokenwire.service.guard._admission import Admission
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

# Larger storms for local runs: TOKENWIRE_STORM_STREAMS=20000 pytest tests/reliability -k storm
STORM = int(os.environ.get("TOKENWIRE_STORM_STREAMS", "2000"))
CONCURRENCY = int(os.environ.get("TOKENWIRE_STORM_CONCURRENCY", "64"))
MODES = ("before_headers", "mid_stream", "last_token", "deadline", "complete")


class RecordingAdmission(Admission):
    """Admission that remembers its instances, so the test can read its counters."""

    made: list[RecordingAdmission] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        RecordingAdmission.made.append(self)

    def caller_slots_used(self) -> int:
        return sum(s.used for s in self._per_caller.values())


@dataclass
class Counts:
    tasks: int
    fds: int
    fake_conns: int  # open connections at the test Ollama (idle keep-alive ones included)
    pool_busy: int  # gateway pool connections not idle (a stream still open)
    pool_total: int
    fake_streaming: int
    relays: int
    admitted: int
    caller_slots: int

    @property
    def tasks_net(self) -> int:
        # Each open connection at the fake has two tasks (handler + socket reader).
        return self.tasks - 2 * self.fake_conns

    @property
    def fds_net(self) -> int:
        # Each loopback connection has both its ends in this process.
        return self.fds - 2 * self.fake_conns


def _counts(runtime: Runtime, fake: FakeOllama, admission: RecordingAdmission) -> Counts:
    pool = runtime.upstream._client._transport._pool  # type: ignore[attr-defined]
    connections = list(pool.connections)
    return Counts(
        tasks=len(asyncio.all_tasks()),
        fds=len(os.listdir("/proc/self/fd")),
        fake_conns=len(fake._conns),
        pool_busy=sum(1 for c in connections if not c.is_idle() and not c.is_closed())
        + (runtime.upstream._lean.in_use if runtime.upstream._lean else 0),  # streams' pool
        pool_total=len(connections),
        fake_streaming=fake.active_streams,
        relays=runtime.servicer.active_streams,
        admitted=admission.in_use,
        caller_slots=admission.caller_slots_used(),
    )


async def _one(stub: GenerationServiceStub, rng: random.Random, mode: str,
               full: str) -> str:
    request = pb.GenerateRequest(model="tiny", prompt="storm")
    timeout = rng.uniform(0.005, 0.06) if mode == "deadline" else 10.0
    call = stub.Generate(request, timeout=timeout)
    try:
        if mode == "before_headers":
            await asyncio.sleep(rng.uniform(0, 0.025))  # Ollama's headers come at 0.03 s
            call.cancel()
        elif mode == "mid_stream":
            for _ in range(rng.randint(1, 6)):
                await call.read()
            call.cancel()
        elif mode == "last_token":
            text = ""
            while text != full:  # tokens may arrive packed together
                token = await call.read()
                assert token is not grpc.aio.EOF
                text += token.text
            call.cancel()  # the final (done) Token is still on its way
        else:
            while await call.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError:
        pass
    return str((await call.code()).name)


@pytest.fixture
def admission_made(monkeypatch: pytest.MonkeyPatch) -> list[RecordingAdmission]:
    RecordingAdmission.made = []
    monkeypatch.setattr(server_module, "Admission", RecordingAdmission)
    return RecordingAdmission.made


async def test_cancellation_storm_leaks_nothing(make_runtime: MakeRuntime, fake: FakeOllama,
                                                admission_made: list[RecordingAdmission],
                                                figures: dict[str, Any]) -> None:
    runtime = await make_runtime(max_streams=CONCURRENCY * 4,
                                 max_streams_per_caller=CONCURRENCY * 4)
    (admission,) = admission_made
    full = "".join(fake.tokens)
    rng = random.Random(20260401)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        # Warm up to the storm's concurrency, so that the pool of idle keep-alive
        # connections (legitimately kept) is as large before as after.
        fake.token_delay = 0.002
        await asyncio.gather(*(_one(stub, rng, "complete", full) for _ in range(CONCURRENCY)))
        await asyncio.sleep(0.2)
        before = _counts(runtime, fake, admission)

        fake.set_fault(Fault(delay_first=0.03))  # every answer: headers after 30 ms
        fake.token_delay = 0.002
        gate = asyncio.Semaphore(CONCURRENCY)
        outcomes: collections.Counter[tuple[str, str]] = collections.Counter()

        async def bounded(mode: str) -> None:
            async with gate:
                outcomes[(mode, await _one(stub, rng, mode, full))] += 1

        modes = [MODES[i % len(MODES)] for i in range(STORM)]
        rng.shuffle(modes)
        started = time.perf_counter()
        await asyncio.gather(*(bounded(m) for m in modes))
        duration = time.perf_counter() - started
        fake.set_fault(None)

        settle_started = time.perf_counter()
        after = _counts(runtime, fake, admission)
        while time.perf_counter() - settle_started < 5.0:
            after = _counts(runtime, fake, admission)
            if (after.fake_streaming == after.relays == after.admitted == after.caller_slots
                    == after.pool_busy == 0 and after.tasks_net <= before.tasks_net
                    and after.fds_net <= before.fds_net):
                break
            await asyncio.sleep(0.05)
        settled = time.perf_counter() - settle_started
        # The gateway still works after the storm.
        assert (await stub.Complete(pb.CompleteRequest(generate=pb.GenerateRequest(
            model="tiny", prompt="after")), timeout=5)).text == full

    by_mode: dict[str, dict[str, int]] = {}
    for (mode, code), n in sorted(outcomes.items()):
        by_mode.setdefault(mode, {})[code] = n
    leaks = {
        "upstream_streams_open": after.fake_streaming,
        "pool_connections_busy": after.pool_busy,
        "relays": after.relays,
        "admission_slots": after.admitted,
        "caller_slots": after.caller_slots,
        "tasks": after.tasks_net - before.tasks_net,
        "fds": after.fds_net - before.fds_net,
    }
    print(f"\nstorm: {STORM} streams, {CONCURRENCY} at a time, in {duration:.2f} s "
          f"({STORM / duration:.0f} streams/s); settled in {settled:.2f} s")
    for mode, codes in by_mode.items():
        print(f"  {mode:<15} {codes}")
    print(f"  baseline: tasks {before.tasks} fds {before.fds} fake connections "
          f"{before.fake_conns} pool {before.pool_total}")
    print(f"  after:    tasks {after.tasks} fds {after.fds} fake connections "
          f"{after.fake_conns} pool {after.pool_total}")
    print(f"  leaks (net of idle keep-alive connections): {leaks}")
    figures["storm"] = {"streams": STORM, "concurrency": CONCURRENCY,
                        "duration_s": round(duration, 2), "settle_s": round(settled, 3),
                        "outcomes": by_mode, "leaks": leaks,
                        "baseline": vars(before), "after": vars(after)}
    assert sum(outcomes.values()) == STORM
    assert all(v <= 0 for v in leaks.values()), leaks
    assert after.pool_total <= CONCURRENCY + 8  # idle connections stay bounded
    assert not fake.errors
    # Every mode really happened: cancelled at each point, and some completed.
    assert by_mode["before_headers"].get("CANCELLED", 0) > 0
    assert by_mode["mid_stream"].get("CANCELLED", 0) > 0
    assert by_mode["last_token"].get("CANCELLED", 0) > 0
    assert by_mode["deadline"].get("DEADLINE_EXCEEDED", 0) > 0
    assert by_mode["complete"] == {"OK": by_mode["complete"]["OK"]}
    assert duration < 45


async def test_cancel_at_the_last_token_releases_everything(make_runtime: MakeRuntime,
                                                            fake: FakeOllama) -> None:
    """The narrowest reproducer of what the storm finds: the caller cancels right
    after the last text token, while the final Token is being written and the
    relay is closing the upstream response. Each such call must leave no relay
    registered (``active_streams``) and no pool connection marked active."""
    runtime = await make_runtime()
    full = "".join(fake.tokens)
    fake.token_delay = 0.002
    rng = random.Random(7)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        gate = asyncio.Semaphore(32)

        async def one() -> str:
            async with gate:
                return await _one(stub, rng, "last_token", full)

        codes = collections.Counter(await asyncio.gather(*(one() for _ in range(300))))
        pool = runtime.upstream._client._transport._pool  # type: ignore[attr-defined]
        deadline = time.perf_counter() + 3.0
        while time.perf_counter() < deadline:
            busy = sum(1 for c in pool.connections if not c.is_idle() and not c.is_closed())
            if runtime.servicer.active_streams == 0 and busy == 0:
                break
            await asyncio.sleep(0.05)
    print(f"\n300 calls cancelled at the last token: {dict(codes)}; left behind: "
          f"{runtime.servicer.active_streams} relays, {busy} busy pool connections, "
          f"{len(pool._requests)} open pool requests")
    assert runtime.servicer.active_streams == 0
    assert busy == 0


RESUME_MODES = ("resume_mid_stream", "abandon", "cancel", "complete", "replay_after_end")


async def _resumable_one(stub: GenerationServiceStub, rng: random.Random, mode: str,
                         full: str) -> str:
    """One resumable stream, left and taken up again (or not) as ``mode`` says; checks
    that what the caller gets adds up to the whole answer, each chunk once."""
    request = pb.GenerateRequest(model="tiny", prompt="storm", resumable=pb.Resumable())
    call = stub.Generate(request, timeout=10)
    try:
        head = await call.read()
        assert head is not grpc.aio.EOF and head.stream_id
        stream_id, text, after = head.stream_id, "", 0
        for _ in range(rng.randint(1, 4) if mode != "complete" else 10_000):
            token = await call.read()
            if token is grpc.aio.EOF:
                break
            text, after = text + token.text, token.position + token.chunk_count
        call.cancel()  # the caller goes away; the stream does not
        if mode == "abandon":
            return "ABANDONED"
        if mode == "cancel":
            await stub.Cancel(pb.CancelRequest(stream_id=stream_id), timeout=5)
            return "CANCELLED_BY_ID"
        if mode == "replay_after_end":
            # Within the 0.5 s grace even on a loaded machine: the replay may start before
            # or after the end, and must be whole either way.
            await asyncio.sleep(0.05)
            text, after = "", 0
        async for token in stub.Resume(pb.ResumeRequest(stream_id=stream_id, after=after),
                                       timeout=10):
            assert token.position == after
            text, after = text + token.text, token.position + token.chunk_count
        assert text == full, (mode, text)  # each chunk once, whatever was left where
        return "RESUMED_WHOLE"
    except grpc.aio.AioRpcError as err:
        return str(err.code().name)


async def test_resumable_storm_keeps_its_bounds_and_leaks_nothing(
        make_runtime: MakeRuntime, fake: FakeOllama, admission_made: list[RecordingAdmission],
        figures: dict[str, Any]) -> None:
    """1,000 resumable streams dropped at random points, resumed, abandoned past their
    grace, cancelled by id and replayed after their end, with bounds small enough to
    drop finished streams: nothing is left generating, held or running afterwards."""
    streams_n = STORM // 2
    runtime = await make_runtime(max_streams=CONCURRENCY * 4,
                                 max_streams_per_caller=CONCURRENCY * 4, detach_grace=0.5,
                                 resume_retention=0.6, resume_max_stream_bytes=64 << 10,
                                 resume_max_bytes=4 << 20)
    (admission,) = admission_made
    kept = runtime.servicer.streams
    assert kept is not None
    full = "".join(fake.tokens)
    rng = random.Random(20261202)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        fake.token_delay = 0.002
        await asyncio.gather(*(_one(stub, rng, "complete", full) for _ in range(CONCURRENCY)))
        await asyncio.sleep(0.2)
        before = _counts(runtime, fake, admission)
        gate = asyncio.Semaphore(CONCURRENCY)
        outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        peak = 0

        async def bounded(mode: str) -> None:
            nonlocal peak
            async with gate:
                outcomes[(mode, await _resumable_one(stub, rng, mode, full))] += 1
                peak = max(peak, kept.budget.held)

        modes = [RESUME_MODES[i % len(RESUME_MODES)] for i in range(streams_n)]
        rng.shuffle(modes)
        started = time.perf_counter()
        await asyncio.gather(*(bounded(m) for m in modes))
        duration = time.perf_counter() - started
        # Past every grace and every retention: nothing may be left.
        after = _counts(runtime, fake, admission)
        for _ in range(100):
            await asyncio.sleep(0.05)
            after = _counts(runtime, fake, admission)
            if (len(kept) == 0 and after.fake_streaming == after.relays == after.admitted
                    == after.pool_busy == 0 and after.tasks_net <= before.tasks_net
                    and after.fds_net <= before.fds_net):
                break
    by_mode: dict[str, dict[str, int]] = {}
    for (mode, code), n in sorted(outcomes.items()):
        by_mode.setdefault(mode, {})[code] = n
    leaks = {"streams_kept": len(kept), "bytes_held": kept.budget.held,
             "upstream_streams_open": after.fake_streaming, "relays": after.relays,
             "admission_slots": after.admitted, "pool_connections_busy": after.pool_busy,
             "tasks": after.tasks_net - before.tasks_net, "fds": after.fds_net - before.fds_net}
    print(f"\nresumable storm: {streams_n} streams, {CONCURRENCY} at a time, in "
          f"{duration:.2f} s; peak held {peak} bytes of {kept.retention.max_bytes}")
    for mode, codes in by_mode.items():
        print(f"  {mode:<18} {codes}")
    print(f"  leaks: {leaks}")
    figures["resumable storm"] = {"streams": streams_n, "duration_s": round(duration, 2),
                                  "peak_bytes": peak, "outcomes": by_mode, "leaks": leaks}
    assert sum(outcomes.values()) == streams_n
    assert peak <= kept.retention.max_bytes
    assert all(v == 0 for v in leaks.values()), leaks
    assert by_mode["resume_mid_stream"] == {"RESUMED_WHOLE": modes.count("resume_mid_stream")}
    assert by_mode["replay_after_end"] == {"RESUMED_WHOLE": modes.count("replay_after_end")}
    assert set(by_mode["abandon"]) == {"ABANDONED"}
    assert not fake.errors
