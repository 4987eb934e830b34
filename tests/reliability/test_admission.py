"""Admission and fairness: concurrency limits (global, per caller, per caller from
the callers file), per-caller request rate, the bounded wait queue, and input
limits. Every refusal names the limit and the value."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama, Fault
from tests.helpers import detail, reason, violations
from tests.reliability._util import bearer, generate_all, outcome, retry_delay
from tokenwire.service.guard._admission import Admission, Overloaded
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
OK = grpc.StatusCode.OK

# Two callers by bearer token (no per-caller policy), for fairness tests.
TOKENS = "alice=tok-alice-1,bob=tok-bob-2"
ALICE, BOB = bearer("tok-alice-1"), bearer("tok-bob-2")


@pytest.fixture
def slow_fake(fake: FakeOllama) -> FakeOllama:
    """Answers take ~10 s, so a stream stays open until the test cancels it."""
    fake.tokens = ["t"] * 200
    fake.token_delay = 0.05
    return fake


class Held:
    """One running Generate stream, admitted (its first token arrived)."""

    def __init__(self, call: Any) -> None:
        self.call = call

    @classmethod
    async def open(cls, stub: GenerationServiceStub, metadata: Any = ()) -> Held:
        call = stub.Generate(pb.GenerateRequest(model="tiny", prompt="hold"), metadata=metadata,
                             timeout=30)
        await call.read()
        return cls(call)

    def release(self) -> None:
        self.call.cancel()


@pytest.fixture
async def stub_for(make_runtime: MakeRuntime) -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    async def make(**settings: Any) -> GenerationServiceStub:
        runtime = await make_runtime(**settings)
        make.runtimes.append(runtime)  # type: ignore[attr-defined]
        channel = grpc.aio.insecure_channel(runtime.target)
        channels.append(channel)
        return GenerationServiceStub(channel)

    make.runtimes = []  # type: ignore[attr-defined]
    yield make
    for channel in channels:
        await channel.close()


async def _refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


async def test_global_max_streams(stub_for: Any, slow_fake: FakeOllama,
                                  figures: dict[str, Any]) -> None:
    stub = await stub_for(max_streams=2)
    held = [await Held.open(stub), await Held.open(stub)]
    started = time.perf_counter()
    err = await _refusal(generate_all(stub))
    took = time.perf_counter() - started
    assert err.code() == RESOURCE_EXHAUSTED
    assert reason(err) == "OVERLOADED"
    assert "limit of 2 concurrent model calls" in (err.details() or "")
    assert "x-request-id" in dict(err.trailing_metadata())
    assert retry_delay(err) > 0
    # The unary model calls count too; calls that run no model do not.
    assert await outcome(stub.Complete(pb.CompleteRequest(
        generate=pb.GenerateRequest(model="tiny", prompt="x")), timeout=5)) == RESOURCE_EXHAUSTED
    assert await outcome(stub.ListModels(pb.ListModelsRequest(), timeout=5)) == OK
    assert slow_fake.max_active_streams == 2
    held[0].release()
    slow_fake.tokens = ["ok"]
    for _ in range(100):  # the slot comes back as soon as the cancel lands
        if await outcome(generate_all(stub)) == OK:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the released slot never came back")
    held[1].release()
    print(f"\nglobal limit 2: third call refused in {took * 1000:.1f} ms: {err.details()!r}, "
          f"retry after {retry_delay(err):g}s")
    figures.setdefault("admission", {})["global_refusal"] = {
        "ms": round(took * 1000, 2), "message": err.details(), "retry_after_s": retry_delay(err)}


async def test_per_caller_limit_from_flag(stub_for: Any, slow_fake: FakeOllama,
                                          monkeypatch: pytest.MonkeyPatch,
                                          figures: dict[str, Any]) -> None:
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", TOKENS)
    stub = await stub_for(max_streams=10, max_streams_per_caller=2)
    held = [await Held.open(stub, ALICE), await Held.open(stub, ALICE)]
    err = await _refusal(generate_all(stub, metadata=ALICE))
    assert err.code() == RESOURCE_EXHAUSTED
    assert "caller 'alice'" in (err.details() or "")
    assert "max streams per caller: 2" in (err.details() or "")
    assert retry_delay(err) > 0
    # Fairness: a busy caller does not take another caller's share.
    bob = [await Held.open(stub, BOB), await Held.open(stub, BOB)]
    assert await outcome(generate_all(stub, metadata=BOB)) == RESOURCE_EXHAUSTED
    for h in held + bob:
        h.release()
    print(f"\nper-caller limit 2: {err.details()!r}")
    figures.setdefault("admission", {})["per_caller_refusal"] = err.details()


@pytest.mark.parametrize(("who", "streams"), [("anonymous", 2000), ("identified", 300)])
async def test_one_peer_address_is_one_caller_only_when_identified(
        stub_for: Any, fake: FakeOllama, figures: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch, who: str, streams: int) -> None:
    """Anonymous callers are told apart only by peer address, which every service
    behind one NAT, node or sidecar shares: by default they get no per-caller limit,
    only --max-streams. 2,000 concurrent streams from one address, otherwise the
    default admission settings: none refused (with the per-caller limit of 256 that
    anonymous callers used to get, 1,744 were; and gRPC core's own queue of calls not
    yet handled, 1,000 by default, shed about 200 with CANCELLED). An identified
    caller (a bearer token) from the same address still gets --max-streams-per-caller
    (256 by default)."""
    metadata: Any = ()
    if who == "identified":
        monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", TOKENS)
        metadata = ALICE
    fake.set_fault(Fault(hang=True, paths=("/api/generate",)))  # every stream stays open
    stub = await stub_for(max_streams=4096, first_token_timeout=120.0)
    runtime = stub_for.runtimes[-1]
    ended: list[str] = []  # calls that ended before the test cancelled them: refused

    async def one() -> None:
        try:
            async for _ in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                                         metadata=metadata, timeout=120):
                pass
        except grpc.aio.AioRpcError as err:
            # RESOURCE_EXHAUSTED from admission, or CANCELLED from gRPC core shedding a
            # burst before admission saw it: either way the call was refused.
            ended.append(f"{err.code().name}: {err.details()}")

    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks = [asyncio.create_task(one()) for _ in range(streams)]
    # Every call is either admitted (it holds a slot) or has ended.
    while runtime.admission.in_use + len(ended) < streams:
        assert loop.time() - started < 60, (runtime.admission.in_use, ended[:3])
        await asyncio.sleep(0.05)
    took = loop.time() - started
    admitted, refused = runtime.admission.in_use, list(ended)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"\none {who} caller, {streams} concurrent streams, --max-streams 4096: "
          f"{admitted} admitted, {len(refused)} refused ({took:.1f}s to open them all)")
    figures.setdefault("admission", {})[f"{who}_caller_streams"] = {
        "streams": streams, "admitted": admitted, "refused": len(refused)}
    if who == "anonymous":
        assert not refused, (len(refused), refused[:3])
        assert admitted == streams
    else:
        assert admitted == 256
        assert len(refused) == streams - 256
        assert all("RESOURCE_EXHAUSTED: caller 'alice'" in r and "per caller: 256" in r
                   for r in refused), refused[:3]


async def test_max_streams_per_peer_limits_anonymous_callers(stub_for: Any,
                                                             slow_fake: FakeOllama) -> None:
    stub = await stub_for(max_streams=10, max_streams_per_peer=2, max_streams_per_caller=1)
    held = [await Held.open(stub), await Held.open(stub)]  # --max-streams-per-caller: n/a
    err = await _refusal(generate_all(stub))
    assert err.code() == RESOURCE_EXHAUSTED
    assert "peer 127.0.0.1 already has 2 model calls running" in (err.details() or "")
    assert "--max-streams-per-peer: 2" in (err.details() or ""), err.details()
    for h in held:
        h.release()


async def test_per_caller_max_streams_from_callers_file(stub_for: Any, slow_fake: FakeOllama,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "callers.toml"
    path.write_text('[callers.small]\ntoken = "tok-small"\nmax_streams = 1\n\n'
                    '[callers.big]\ntoken = "tok-big"\n')
    stub = await stub_for(callers_file=str(path), max_streams_per_caller=3)
    small = await Held.open(stub, bearer("tok-small"))
    err = await _refusal(generate_all(stub, metadata=bearer("tok-small")))
    assert err.code() == RESOURCE_EXHAUSTED
    assert "caller 'small'" in (err.details() or "") and ": 1)" in (err.details() or "")
    big = [await Held.open(stub, bearer("tok-big")) for _ in range(3)]
    assert await outcome(generate_all(stub, metadata=bearer("tok-big"))) == RESOURCE_EXHAUSTED
    for h in [small, *big]:
        h.release()


async def test_rate_limit_token_bucket(stub_for: Any, monkeypatch: pytest.MonkeyPatch,
                                       figures: dict[str, Any]) -> None:
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", TOKENS)
    stub = await stub_for(rate=5.0, burst=3)
    results = [await outcome(stub.ListModels(pb.ListModelsRequest(), metadata=ALICE,
                                             timeout=5)) for _ in range(4)]
    assert results[:3] == [OK] * 3
    assert results[3] == RESOURCE_EXHAUSTED
    err = await _refusal(stub.ListModels(pb.ListModelsRequest(), metadata=ALICE, timeout=5))
    assert "caller 'alice' is over its rate limit of 5 requests/s (burst 3)" in \
        (err.details() or "")
    delay = retry_delay(err)
    assert 0 < delay <= 0.2 + 1e-6  # one request's worth of refill at 5/s
    # Each caller has a bucket of its own.
    assert await outcome(stub.ListModels(pb.ListModelsRequest(), metadata=BOB)) == OK
    await asyncio.sleep(delay + 0.02)  # honouring RetryInfo is enough
    assert await outcome(stub.ListModels(pb.ListModelsRequest(), metadata=ALICE,
                                         timeout=5)) == OK
    print(f"\nrate 5/s burst 3: 4th call refused, RetryInfo {delay * 1000:.0f} ms; "
          "retrying after it succeeds")
    figures.setdefault("admission", {})["rate_refusal"] = {
        "message": err.details(), "retry_after_s": round(delay, 3)}


async def test_anonymous_rate_is_per_peer_and_off_by_default(stub_for: Any) -> None:
    """--rate is per identified caller; anonymous callers share a peer address (a NAT,
    a node, a sidecar), so only --rate-per-peer limits them, and it is off by default."""
    open_stub = await stub_for(rate=5.0, burst=3)
    for _ in range(30):
        assert await outcome(open_stub.ListModels(pb.ListModelsRequest(), timeout=5)) == OK
    stub = await stub_for(rate_per_peer=5.0, burst=3)
    results = [await outcome(stub.ListModels(pb.ListModelsRequest(), timeout=5))
               for _ in range(4)]
    assert results == [OK, OK, OK, RESOURCE_EXHAUSTED]
    err = await _refusal(stub.ListModels(pb.ListModelsRequest(), timeout=5))
    assert ("peer 127.0.0.1 is over its rate limit of 5 requests/s (burst 3; --rate-per-peer)"
            in (err.details() or "")), err.details()
    assert 0 < retry_delay(err) <= 0.2 + 1e-6


async def test_per_caller_rate_from_callers_file(stub_for: Any, tmp_path: Path) -> None:
    path = tmp_path / "callers.toml"
    path.write_text('[callers.slow]\ntoken = "tok-slow"\nrate = 1.0\nburst = 1\n\n'
                    '[callers.fast]\ntoken = "tok-fast"\n')
    stub = await stub_for(callers_file=str(path))
    slow, fast = bearer("tok-slow"), bearer("tok-fast")
    assert await outcome(stub.ListModels(pb.ListModelsRequest(), metadata=slow)) == OK
    err = await _refusal(stub.ListModels(pb.ListModelsRequest(), metadata=slow))
    assert err.code() == RESOURCE_EXHAUSTED and "caller 'slow'" in (err.details() or "")
    assert 0.5 < retry_delay(err) <= 1.0
    # No flag rate: the other caller is not limited at all.
    for _ in range(30):
        assert await outcome(stub.ListModels(pb.ListModelsRequest(), metadata=fast)) == OK


async def test_queue_waits_for_a_free_slot(stub_for: Any, slow_fake: FakeOllama,
                                           figures: dict[str, Any]) -> None:
    stub = await stub_for(max_streams=1, queue_timeout=5.0)
    held = await Held.open(stub)
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(outcome(stub.Complete(pb.CompleteRequest(
        generate=pb.GenerateRequest(model="tiny", prompt="queued")), timeout=20)))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # queued, not refused
    assert slow_fake.active_streams == 1  # and not sent to the model yet
    slow_fake.tokens = ["short"]
    held.release()
    assert await waiting == OK
    waited = loop.time() - started
    assert 0.3 <= waited < 2.0
    print(f"\nqueue: a call waited {waited:.2f}s and ran as soon as the slot freed")
    figures.setdefault("admission", {})["queued_then_ran_s"] = round(waited, 3)


async def test_queue_refuses_when_the_wait_runs_out(stub_for: Any, slow_fake: FakeOllama,
                                                    figures: dict[str, Any]) -> None:
    stub = await stub_for(max_streams=1, queue_timeout=0.3)
    held = await Held.open(stub)
    started = time.perf_counter()
    err = await _refusal(generate_all(stub, timeout=10))
    waited = time.perf_counter() - started
    held.release()
    assert err.code() == RESOURCE_EXHAUSTED
    assert detail(err, error_details_pb2.RetryInfo).retry_delay.ToNanoseconds() > 0
    assert 0.3 <= waited < 1.0
    print(f"\nqueue timeout 0.3s: refused after {waited:.2f}s")
    figures.setdefault("admission", {})["queue_timeout_refusal_s"] = round(waited, 3)


async def test_queue_never_waits_past_the_deadline(stub_for: Any, slow_fake: FakeOllama,
                                                   figures: dict[str, Any]) -> None:
    stub = await stub_for(max_streams=1, queue_timeout=5.0)
    held = await Held.open(stub)
    started = time.perf_counter()
    code = await outcome(generate_all(stub, timeout=0.4))
    took = time.perf_counter() - started
    held.release()
    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED)
    assert took < 0.4 + 0.25
    assert slow_fake.max_active_streams == 1  # the queued call never reached the model
    print(f"\nqueue 5s, deadline 0.4s: ended with {code.name} after {took:.2f}s")
    figures.setdefault("admission", {})["queue_deadline"] = {"code": code.name,
                                                             "s": round(took, 3)}


async def test_caller_slot_comes_back_after_a_queued_call_is_abandoned(
        stub_for: Any, slow_fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that holds its per-caller slot while it queues for a global one,
    and is then cancelled (or reaches its deadline), must give the caller's slot
    back; otherwise the caller is locked out for good."""
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", TOKENS)
    stub = await stub_for(max_streams=1, max_streams_per_caller=1, queue_timeout=5.0)
    alice = await Held.open(stub, ALICE)
    # Bob takes his only per-caller slot, then waits for the global one ...
    queued = stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"), metadata=BOB,
                           timeout=10)
    await asyncio.sleep(0.2)
    queued.cancel()  # ... and gives up (Ctrl-C, a client-side timeout, a dropped connection).
    assert await queued.code() == grpc.StatusCode.CANCELLED
    # Once Alice is done, Bob must get in at once.
    alice.release()
    slow_fake.tokens = ["ok"]
    await asyncio.sleep(0.1)
    started = time.perf_counter()
    code = await outcome(generate_all(stub, metadata=BOB, timeout=2.0))
    assert code == OK, f"bob got {code.name} after {time.perf_counter() - started:.2f}s"


# -- input limits -----------------------------------------------------------------------


async def test_input_limits_name_the_limit_and_the_value(stub_for: Any, fake: FakeOllama,
                                                         figures: dict[str, Any]) -> None:
    stub = await stub_for(max_prompt_bytes=100, max_messages=3, max_images_bytes=1000,
                          max_output_tokens=5)
    user = pb.Message(role=pb.ROLE_USER, content="hi")
    cases: list[tuple[str, Any, str, str]] = [
        ("prompt over --max-prompt-bytes",
         generate_all(stub, pb.GenerateRequest(model="tiny", prompt="x" * 101)),
         "prompt", "101 bytes, over the limit of 100 bytes"),
        ("chat text over --max-prompt-bytes",
         generate_all_chat(stub, pb.ChatRequest(model="tiny", messages=[
             pb.Message(role=pb.ROLE_USER, content="y" * 60)] * 2)),
         "messages", "totals 120 bytes, over the limit of 100 bytes"),
        ("embed inputs over --max-prompt-bytes",
         stub.Embed(pb.EmbedRequest(model="embedder", inputs=["z" * 51, "z" * 51]), timeout=5),
         "inputs", "inputs total 102 bytes, over the limit of 100 bytes"),
        ("messages over --max-messages",
         generate_all_chat(stub, pb.ChatRequest(model="tiny", messages=[user] * 4)),
         "messages", "4 messages, over the limit of 3"),
        ("images over --max-images-bytes",
         generate_all(stub, pb.GenerateRequest(model="tiny", prompt="p",
                                               images=[b"\x89PNG" + b"\0" * 997])),
         "images", "images total 1001 bytes, over the limit of 1000 bytes"),
        ("max_tokens over --max-output-tokens",
         generate_all(stub, pb.GenerateRequest(model="tiny", prompt="p",
                                               options=pb.Options(max_tokens=6))),
         "options.max_tokens", "at most 5 (this server's --max-output-tokens), got 6"),
        ("max_tokens -1 (unlimited) under a cap",
         generate_all(stub, pb.GenerateRequest(model="tiny", prompt="p",
                                               options=pb.Options(max_tokens=-1))),
         "options.max_tokens", "got -1"),
    ]
    rows = []
    for name, call, field, text in cases:
        err = await _refusal(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        found = violations(err)
        assert any(f == field and text in d for f, d in found), (name, found)
        rows.append({"case": name, "status": err.code().name, "violations": found})
    assert not any(r.path in ("/api/generate", "/api/chat", "/api/embed") for r in fake.requests)
    print("\ninput limits:")
    for row in rows:
        print(f"  {row['case']:<38} {row['status']}  {row['violations']}")
    figures.setdefault("admission", {})["input_limits"] = rows


async def generate_all_chat(stub: GenerationServiceStub, request: pb.ChatRequest) -> None:
    async for _ in stub.Chat(request, timeout=5):
        pass


@pytest.mark.parametrize("rpc", ["Generate", "Chat", "Complete"])
async def test_output_cap_applies_when_a_request_sets_none(stub_for: Any, fake: FakeOllama,
                                                           rpc: str) -> None:
    stub = await stub_for(max_output_tokens=5)
    generate = pb.GenerateRequest(model="tiny", prompt="p")
    chat = pb.ChatRequest(model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content="p")])
    if rpc == "Generate":
        tokens = await generate_all(stub, generate)
        text, finish = "".join(t.text for t in tokens), tokens[-1].finish_reason
    elif rpc == "Chat":
        tokens = [t async for t in stub.Chat(chat, timeout=5)]
        text, finish = "".join(t.text for t in tokens), tokens[-1].finish_reason
    else:
        response = await stub.Complete(pb.CompleteRequest(generate=generate), timeout=5)
        text, finish = response.text, response.finish_reason
    assert fake.requests[-1].body["options"]["num_predict"] == 5
    assert text == "".join(fake.tokens[:5])
    assert finish == pb.FINISH_REASON_LENGTH
    # A request's own smaller limit is kept.
    await generate_all(stub, pb.GenerateRequest(model="tiny", prompt="p",
                                                options=pb.Options(max_tokens=2)))
    assert fake.requests[-1].body["options"]["num_predict"] == 2


async def test_message_over_max_message_bytes(stub_for: Any, fake: FakeOllama,
                                              figures: dict[str, Any]) -> None:
    stub = await stub_for(max_message_bytes=64 * 1024)
    err = await _refusal(generate_all(stub, pb.GenerateRequest(model="tiny",
                                                               prompt="x" * 100_000)))
    assert err.code() == RESOURCE_EXHAUSTED
    assert "vs. 65536" in (err.details() or "")  # the value and the limit
    assert await outcome(generate_all(stub)) == OK  # and the server keeps serving
    print(f"\n--max-message-bytes 65536: {err.code().name}: {err.details()!r}")
    figures.setdefault("admission", {})["max_message_bytes"] = err.details()


async def test_per_caller_state_does_not_grow_with_distinct_callers() -> None:
    # Anonymous callers are keyed by peer address: a long-running gateway sees many. Their
    # slots go when their last call ends; their rate buckets once refilled (swept lazily).
    now = [1000.0]
    admission = Admission(max_streams=64, max_streams_per_caller=2, rate=1.0, burst=2,
                          queue_timeout=0.0, clock=lambda: now[0])
    for i in range(500):
        admission.check_rate(f"peer:10.0.{i // 250}.{i % 250}")
        ticket = await admission.admit(f"peer:10.0.{i // 250}.{i % 250}")
        ticket.release()
    assert admission.callers_tracked == 500  # buckets still refilling
    held = await admission.admit("busy")
    refused = admission.admit("busy", max_streams=1)  # over its own limit: refused at once
    with pytest.raises(Overloaded):
        await refused
    now[0] += 11.0  # every bucket is full again; the next request sweeps them
    admission.check_rate("late")
    assert admission.callers_tracked == 2  # "late"'s bucket and "busy"'s running call
    held.release()
    assert admission.callers_tracked == 1
    assert admission.in_use == 0


async def test_a_refilling_bucket_survives_the_sweep() -> None:
    now = [0.0]
    admission = Admission(max_streams=8, max_streams_per_caller=8, rate=0.05, burst=1,
                          queue_timeout=0.0, clock=lambda: now[0])
    admission.check_rate("slow")  # empty now; full again after 20 s
    now[0] += 11.0
    admission.check_rate("other")  # sweeps
    with pytest.raises(Overloaded):  # "slow" was not forgotten (which would refill it)
        admission.check_rate("slow")


async def test_caller_limits_without_identified_callers_are_reported(
        stub_for: Any, caplog: pytest.LogCaptureFixture) -> None:
    """--rate and --max-streams-per-caller limit identified callers; on a server that
    identifies nobody they would do nothing, so the server says so at start."""
    caplog.set_level(logging.WARNING, logger="tokenwire.service")
    await stub_for(rate=5.0, max_streams_per_caller=8)
    warned = [r.getMessage() for r in caplog.records if "identified callers only" in
              r.getMessage()]
    assert len(warned) == 1 and "--rate and --max-streams-per-caller" in warned[0], warned
    assert "--rate-per-peer" in warned[0] and "--max-streams-per-peer" in warned[0]
    caplog.clear()
    await stub_for(rate_per_peer=5.0, max_streams_per_peer=8)
    assert not [r for r in caplog.records if "identified callers only" in r.getMessage()]
