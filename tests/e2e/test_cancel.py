"""Cancellation reaches Ollama: the test upstream sees its socket close."""

from __future__ import annotations

import asyncio

import grpc

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

GEN = pb.GenerateRequest(model="tiny", prompt="p")


async def _wait_idle(fake: FakeOllama) -> None:
    for _ in range(200):
        if fake.active_streams == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{fake.active_streams} upstream stream(s) still open")


async def test_caller_cancel_closes_upstream(stub: GenerationServiceStub,
                                            fake: FakeOllama) -> None:
    fake.token_delay = 0.5  # a slow model: the next chunk is far away
    call = stub.Generate(GEN)
    await call.read()
    await call.read()
    loop = asyncio.get_running_loop()
    cancelled_at = loop.time()
    call.cancel()
    seen_at = await fake.wait_for_disconnect(timeout=2)
    assert seen_at - cancelled_at < 0.25
    assert not fake.streams[-1].completed
    assert fake.streams[-1].chunks_sent <= 3
    await _wait_idle(fake)


async def test_deadline_closes_upstream(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.token_delay = 0.5
    tokens = []
    try:
        async for token in stub.Generate(GEN, timeout=0.8):
            tokens.append(token)
        raise AssertionError("the deadline should have ended the call")
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= len(tokens) <= 2
    await fake.wait_for_disconnect(timeout=2)
    assert not fake.streams[-1].completed


async def test_deadline_during_first_token_wait_closes_upstream(
    stub: GenerationServiceStub, fake: FakeOllama
) -> None:
    fake.token_delay = 0.0
    from tests.fakeollama import Fault
    fake.set_fault(Fault(hang=True))
    try:
        await stub.Complete(pb.CompleteRequest(generate=GEN), timeout=0.4)
        raise AssertionError("the deadline should have ended the call")
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await fake.wait_for_disconnect(timeout=2)


async def test_dropped_client_connection_closes_upstream(runtime: Runtime,
                                                         fake: FakeOllama) -> None:
    fake.token_delay = 0.5
    channel = grpc.aio.insecure_channel(runtime.target)
    call = GenerationServiceStub(channel).Generate(GEN)
    await call.read()
    await channel.close(grace=None)  # the caller goes away without a word
    await fake.wait_for_disconnect(timeout=2)
    await _wait_idle(fake)


async def test_many_cancellations_leave_nothing_open(stub: GenerationServiceStub,
                                                     fake: FakeOllama) -> None:
    fake.token_delay = 0.02
    tasks = []
    for i in range(50):
        call = stub.Generate(pb.GenerateRequest(model="tiny", prompt=f"p{i}"))

        async def cancel_after(call: grpc.aio.UnaryStreamCall, n: int) -> None:
            for _ in range(n):
                await call.read()
            call.cancel()

        tasks.append(cancel_after(call, i % 4 + 1))
    await asyncio.gather(*tasks)
    await _wait_idle(fake)
    assert sum(1 for s in fake.streams if s.disconnected.is_set()) == 50
    # and the server still answers
    assert [t async for t in stub.Generate(GEN)][-1].done


async def test_shutdown_lets_in_flight_stream_finish(make_runtime: MakeRuntime,
                                                     fake: FakeOllama) -> None:
    runtime = await make_runtime()
    fake.token_delay = 0.05
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        call = stub.Generate(GEN)
        await call.read()
        stopping = asyncio.create_task(runtime.stop(grace=5))
        rest = []
        while (token := await call.read()) is not grpc.aio.EOF:
            rest.append(token)
        assert rest[-1].done
        await stopping
        assert runtime.health.serving is False
