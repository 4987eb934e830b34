"""Resumable streams against the test Ollama: ids, positions, detach, Resume, Cancel,
owners and retention (the in-memory buffer)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

WORDS = [f"w{i} " for i in range(40)]


def _gen(grace: float | None = None, **fields: object) -> pb.GenerateRequest:
    resumable = pb.Resumable()
    if grace is not None:
        resumable.detach_grace.CopyFrom(Duration(seconds=int(grace),
                                                 nanos=int(grace % 1 * 1e9)))
    return pb.GenerateRequest(model="tiny", prompt="p", resumable=resumable, **fields)


def _reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo")


@dataclass
class Got:
    """What one reader received: text, the chunks it covers, and the final Token."""

    text: str = ""
    next: int = 0  # position + chunk_count of the last Token
    final: pb.Token | None = None
    stream_id: str = ""

    def add(self, token: pb.Token) -> None:
        if token.stream_id:
            assert not self.stream_id and not token.text and not token.chunk_count
            self.stream_id = token.stream_id
            return
        assert token.position == self.next, (token.position, self.next)
        self.text += token.text
        self.next = token.position + token.chunk_count
        if token.done:
            self.final = token


async def _read(call: grpc.aio.UnaryStreamCall, got: Got, limit: int | None = None) -> Got:
    n = 0
    async for token in call:
        got.add(token)
        n += 1
        if limit is not None and n >= limit:
            call.cancel()
            break
    return got


async def _whole(stub: GenerationServiceStub) -> str:
    answer = await stub.Complete(pb.CompleteRequest(generate=pb.GenerateRequest(
        model="tiny", prompt="p")))
    return answer.text


async def test_id_first_then_positions_then_final(stub: GenerationServiceStub,
                                                  fake: FakeOllama) -> None:
    fake.tokens = WORDS
    got = await _read(stub.Generate(_gen()), Got())
    assert len(got.stream_id) >= 22  # 18 random bytes in URL-safe base64: 144 bits
    assert got.text == "".join(WORDS)
    assert got.final is not None and got.final.done
    assert got.next == len(WORDS) + 1  # every chunk, the final one included
    assert got.final.usage.completion_tokens == len(WORDS)


async def test_ids_differ(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = ["a"]
    ids = {(await _read(stub.Generate(_gen()), Got())).stream_id for _ in range(20)}
    assert len(ids) == 20


async def test_ids_never_start_with_a_dash(stub: GenerationServiceStub, fake: FakeOllama,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`tokenwire resume ID` would read such an id as an option: one is drawn again."""
    drawn = iter(["-starts-with-a-dash-xyz", "ok-after-the-dash-xyz12"])
    monkeypatch.setattr("secrets.token_urlsafe", lambda _n: next(drawn))
    fake.tokens = ["a"]
    got = await _read(stub.Generate(_gen()), Got())
    assert got.stream_id == "ok-after-the-dash-xyz12"


async def test_drop_then_resume_from_position_each_chunk_once(
        runtime: Runtime, stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.01
    channel = grpc.aio.insecure_channel(runtime.target)
    first = await _read(GenerationServiceStub(channel).Generate(_gen()), Got(), limit=6)
    await channel.close(grace=None)  # the caller goes away without a word
    assert first.final is None and first.next > 0
    assert fake.streams[-1].disconnected_at is None  # generation goes on
    got = await _read(stub.Resume(pb.ResumeRequest(stream_id=first.stream_id,
                                                   after=first.next)),
                      Got(next=first.next, stream_id=first.stream_id))
    assert first.text + got.text == "".join(WORDS)
    assert got.final is not None and got.final.usage.completion_tokens == len(WORDS)
    assert fake.streams[-1].completed


async def test_resume_after_the_end_replays_what_is_missing(
        stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    whole = await _read(stub.Generate(_gen()), Got())
    for after in (0, 1, 17, whole.next - 1, whole.next):
        got = await _read(stub.Resume(pb.ResumeRequest(stream_id=whole.stream_id,
                                                       after=after)), Got(next=after))
        assert got.final is not None
        # The same final figures for every reader.
        assert got.final.usage == whole.final.usage  # type: ignore[union-attr]
        assert got.final.finish_reason == pb.FINISH_REASON_STOP
        assert got.next == whole.next
    replay = await _read(stub.Resume(pb.ResumeRequest(stream_id=whole.stream_id, after=0)),
                         Got())
    assert replay.text == whole.text


@pytest.mark.parametrize("delivery", [
    pb.Delivery(mode=pb.DELIVERY_MODE_EACH_TOKEN),
    pb.Delivery(mode=pb.DELIVERY_MODE_BATCH, max_tokens=7),
    pb.Delivery(mode=pb.DELIVERY_MODE_ADAPTIVE),
])
async def test_delivery_modes_on_resume(stub: GenerationServiceStub, fake: FakeOllama,
                                        delivery: pb.Delivery) -> None:
    fake.tokens = WORDS
    whole = await _read(stub.Generate(_gen()), Got())
    counts = []
    got = Got(next=3)
    async for token in stub.Resume(pb.ResumeRequest(stream_id=whole.stream_id, after=3,
                                                    delivery=delivery)):
        got.add(token)
        counts.append(token.chunk_count)
    assert got.text == "".join(WORDS[3:])
    if delivery.mode == pb.DELIVERY_MODE_EACH_TOKEN:
        assert set(counts) == {1}
    elif delivery.mode == pb.DELIVERY_MODE_BATCH:
        assert counts[0] == 7 and max(counts) == 7


async def test_detach_grace_expiry_stops_the_engine(runtime: Runtime,
                                                    fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.05
    channel = grpc.aio.insecure_channel(runtime.target)
    first = await _read(GenerationServiceStub(channel).Generate(_gen(grace=0.3)), Got(),
                        limit=3)
    loop = asyncio.get_running_loop()
    dropped = loop.time()
    await channel.close(grace=None)
    seen = await fake.wait_for_disconnect(timeout=3)
    assert 0.25 <= seen - dropped < 0.8  # the grace, not the drop, ends it
    assert not fake.streams[-1].completed
    async with grpc.aio.insecure_channel(runtime.target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read(GenerationServiceStub(ch).Resume(
                pb.ResumeRequest(stream_id=first.stream_id, after=first.next)),
                Got(next=first.next))
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert _reason(caught.value) == "STREAM_CANCELLED"
    assert "detach grace" in (caught.value.details() or "")


async def test_grace_is_capped_by_the_server(make_runtime: MakeRuntime,
                                             fake: FakeOllama) -> None:
    runtime = await make_runtime(detach_grace=0.3)
    fake.tokens = WORDS
    fake.token_delay = 0.05
    channel = grpc.aio.insecure_channel(runtime.target)
    await _read(GenerationServiceStub(channel).Generate(_gen(grace=3600)), Got(), limit=2)
    dropped = asyncio.get_running_loop().time()
    await channel.close(grace=None)
    seen = await fake.wait_for_disconnect(timeout=3)
    assert seen - dropped < 0.8


async def test_cancel_stops_the_engine_at_once(stub: GenerationServiceStub,
                                               fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.2
    started = await stub.Start(pb.StartRequest(generate=pb.GenerateRequest(
        model="tiny", prompt="p")))
    await asyncio.sleep(0.3)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    answer = await stub.Cancel(pb.CancelRequest(stream_id=started.stream_id))
    seen = await fake.wait_for_disconnect(timeout=2)
    assert answer.stopped
    assert seen - asked < 0.05
    again = await stub.Cancel(pb.CancelRequest(stream_id=started.stream_id))
    assert not again.stopped
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _read(stub.Resume(pb.ResumeRequest(stream_id=started.stream_id)), Got())
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert "Cancel" in (caught.value.details() or "")


async def test_start_then_resume_reads_it_all(stub: GenerationServiceStub,
                                              fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.005
    started = await stub.Start(pb.StartRequest(chat=pb.ChatRequest(
        model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])))
    await asyncio.sleep(0.05)
    got = await _read(stub.Resume(pb.ResumeRequest(stream_id=started.stream_id)), Got())
    assert got.text == "".join(WORDS)
    assert got.final is not None and got.final.done


async def test_unknown_and_foreign_ids_are_not_found(make_runtime: MakeRuntime,
                                                     fake: FakeOllama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    callers = tmp_path / "callers.toml"
    callers.write_text('[callers.alice]\ntoken = "alice-token"\n'
                       '[callers.bob]\ntoken = "bob-token"\n')
    runtime = await make_runtime(callers_file=str(callers))
    fake.tokens = WORDS
    fake.token_delay = 0.05
    alice = (("authorization", "Bearer alice-token"),)
    bob = (("authorization", "Bearer bob-token"),)
    async with grpc.aio.insecure_channel(runtime.target) as ch:
        stub = GenerationServiceStub(ch)
        started = await stub.Start(pb.StartRequest(generate=pb.GenerateRequest(
            model="tiny", prompt="p")), metadata=alice)
        messages = {}
        for name, stream_id in (("foreign", started.stream_id),
                                ("unknown", "A" * 24)):
            for rpc in ("Resume", "Cancel"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    if rpc == "Resume":
                        await _read(stub.Resume(pb.ResumeRequest(stream_id=stream_id),
                                                metadata=bob), Got())
                    else:
                        await stub.Cancel(pb.CancelRequest(stream_id=stream_id), metadata=bob)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                messages[name, rpc] = caught.value.details()
        # Bob cannot tell Alice's id from one that never existed.
        assert messages["foreign", "Resume"] == messages["unknown", "Resume"]
        assert messages["foreign", "Cancel"] == messages["unknown", "Cancel"]
        # Alice's stream went on regardless, and is hers.
        got = await _read(stub.Resume(pb.ResumeRequest(stream_id=started.stream_id),
                                      metadata=alice), Got())
        assert got.text == "".join(WORDS)


async def test_expired_says_so(make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    runtime = await make_runtime(resume_retention=0.2)
    fake.tokens = ["a", "b"]
    async with grpc.aio.insecure_channel(runtime.target) as ch:
        stub = GenerationServiceStub(ch)
        whole = await _read(stub.Generate(_gen()), Got())
        await asyncio.sleep(0.4)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read(stub.Resume(pb.ResumeRequest(stream_id=whole.stream_id)), Got())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "--resume-retention" in (caught.value.details() or "")


async def test_bad_requests(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = ["a", "b"]
    whole = await _read(stub.Generate(_gen()), Got())
    cases = [
        (stub.Resume(pb.ResumeRequest(stream_id="short")), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.Resume(pb.ResumeRequest(stream_id=whole.stream_id, after=whole.next + 1)),
         grpc.StatusCode.OUT_OF_RANGE),
    ]
    for call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read(call, Got())
        assert caught.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(pb.CompleteRequest(generate=_gen()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Start(pb.StartRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_error_is_replayed_the_same(stub: GenerationServiceStub,
                                             fake: FakeOllama) -> None:
    from tests.fakeollama import Fault
    fake.tokens = WORDS
    fake.set_fault(Fault(drop_after=5))
    got = Got()
    with pytest.raises(grpc.aio.AioRpcError) as first:
        await _read(stub.Generate(_gen()), got)
    assert got.next == 5
    again = Got(next=2)
    with pytest.raises(grpc.aio.AioRpcError) as second:
        await _read(stub.Resume(pb.ResumeRequest(stream_id=got.stream_id, after=2)), again)
    assert second.value.code() == first.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _reason(second.value) == _reason(first.value)
    assert again.text == "".join(WORDS[2:5])


async def test_stream_over_its_bound_ends_clearly(make_runtime: MakeRuntime,
                                                  fake: FakeOllama) -> None:
    runtime = await make_runtime(resume_max_stream_bytes=2000, resume_max_bytes=10_000)
    fake.tokens = WORDS * 5
    async with grpc.aio.insecure_channel(runtime.target) as ch:
        stub = GenerationServiceStub(ch)
        got = Got()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read(stub.Generate(_gen()), got)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _reason(caught.value) == "RESUME_STREAM_TOO_LARGE"
        assert got.text and "".join(WORDS * 5).startswith(got.text)
        # The bound is per stream: the next (short) one is fine.
        fake.tokens = ["a"]
        assert (await _read(stub.Generate(_gen()), Got())).text == "a"


async def test_full_buffers_refuse_at_start_and_drop_finished_first(
        make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    runtime = await make_runtime(resume_max_stream_bytes=3000, resume_max_bytes=4000)
    fake.tokens = WORDS
    fake.token_delay = 0.05
    async with grpc.aio.insecure_channel(runtime.target) as ch:
        stub = GenerationServiceStub(ch)
        old = await _read(stub.Generate(pb.GenerateRequest(
            model="tiny", prompt="p", resumable=pb.Resumable(),
            options=pb.Options(max_tokens=3))), Got())  # finished, small
        assert runtime.servicer.streams is not None
        old_bytes = runtime.servicer.streams.budget.held
        live = await stub.Start(pb.StartRequest(generate=pb.GenerateRequest(
            model="tiny", prompt="p")))
        streams = runtime.servicer.streams
        assert streams is not None
        for _ in range(200):  # until the live one holds that much
            if streams.budget.held - old_bytes >= 1200:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Start(pb.StartRequest(generate=pb.GenerateRequest(
                model="tiny", prompt="p")))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _reason(caught.value) == "RESUME_BUFFERS_FULL"
        # The finished stream was dropped to make room, and says so.
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await _read(stub.Resume(pb.ResumeRequest(stream_id=old.stream_id)), Got())
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert "make room" in (gone.value.details() or "")
        await stub.Cancel(pb.CancelRequest(stream_id=live.stream_id))
        assert runtime.servicer.streams is not None
        assert runtime.servicer.streams.live == 0


async def test_detached_stream_holds_its_admission_slot(make_runtime: MakeRuntime,
                                                        fake: FakeOllama) -> None:
    runtime = await make_runtime(max_streams=1)
    fake.tokens = WORDS
    fake.token_delay = 0.05
    async with grpc.aio.insecure_channel(runtime.target) as ch:
        stub = GenerationServiceStub(ch)
        started = await stub.Start(pb.StartRequest(generate=pb.GenerateRequest(
            model="tiny", prompt="p")))
        assert runtime.admission.in_use == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read(stub.Generate(pb.GenerateRequest(model="tiny", prompt="p")), Got())
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await _read(stub.Resume(pb.ResumeRequest(stream_id=started.stream_id)), Got())
        for _ in range(100):
            if runtime.admission.in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert runtime.admission.in_use == 0


async def test_the_callers_deadline_detaches_and_does_not_cancel(
        stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.02
    got = Got()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _read(stub.Generate(_gen(), timeout=0.3), got)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < got.next < len(WORDS)
    rest = await _read(stub.Resume(pb.ResumeRequest(stream_id=got.stream_id, after=got.next)),
                       Got(next=got.next))
    assert got.text + rest.text == "".join(WORDS)
    assert fake.streams[-1].completed and fake.streams[-1].disconnected_at is None


async def test_metrics_count_resumable_streams(make_runtime: MakeRuntime,
                                               fake: FakeOllama) -> None:
    from tests.helpers import samples, scrape, value
    runtime = await make_runtime(metrics_listen="127.0.0.1:0", resume_retention=0.5)
    assert runtime.metrics_port is not None
    fake.tokens = WORDS
    fake.token_delay = 0.02
    async with grpc.aio.insecure_channel(runtime.target) as ch:
        stub = GenerationServiceStub(ch)
        live = await stub.Start(pb.StartRequest(generate=pb.GenerateRequest(
            model="tiny", prompt="p")))
        found = samples((await scrape(runtime.metrics_port)).text)
        assert value(found, "tokenwire_resumable_streams", state="live") == 1
        await _read(stub.Resume(pb.ResumeRequest(stream_id=live.stream_id)), Got())
        await asyncio.sleep(0.05)
        found = samples((await scrape(runtime.metrics_port)).text)
        assert value(found, "tokenwire_resumable_streams", state="live") == 0
        assert value(found, "tokenwire_resumable_streams", state="kept") == 1
        assert value(found, "tokenwire_resumable_bytes") > 0
        await asyncio.sleep(0.6)  # past the retention
        found = samples((await scrape(runtime.metrics_port)).text)
        assert value(found, "tokenwire_resumable_streams", state="kept") == 0
        assert value(found, "tokenwire_resumable_bytes") == 0
