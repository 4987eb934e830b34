"""Delivery modes: how model tokens are grouped into messages."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.fakeollama import FakeOllama, Fault
from tests.helpers import joined, violations
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub


def _request(**delivery: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="tiny", prompt="p", delivery=pb.Delivery(**delivery))


async def _read_late(call: grpc.aio.UnaryStreamCall) -> list[pb.Token]:
    first = await call.read()
    await asyncio.sleep(0.3)  # fall behind while the model runs ahead
    tokens = [first]
    while (token := await call.read()) is not grpc.aio.EOF:
        tokens.append(token)
    return tokens


async def test_each_token_mode_never_packs(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = [f"t{i} " for i in range(200)]
    tokens = await _read_late(stub.Generate(_request(mode=pb.DELIVERY_MODE_EACH_TOKEN)))
    assert [t.chunk_count for t in tokens] == [1] * 201
    assert joined(tokens) == "".join(fake.tokens)


async def test_batch_by_count(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = [f"t{i} " for i in range(23)]
    tokens = [t async for t in stub.Generate(_request(mode=pb.DELIVERY_MODE_BATCH,
                                                      max_tokens=5))]
    assert [t.chunk_count for t in tokens] == [5, 5, 5, 5, 4]  # the last group holds "done"
    assert joined(tokens) == "".join(fake.tokens) and tokens[-1].done


async def test_batch_at_sentence_ends(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = ["One", " two", ".", " Three", "!", " Four", " five", "\n", "six"]
    tokens = [t async for t in stub.Generate(_request(mode=pb.DELIVERY_MODE_BATCH,
                                                      at_sentence_end=True))]
    assert [t.text for t in tokens] == ["One two.", " Three!", " Four five\n", "six"]


async def test_batch_by_age(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.tokens = [f"t{i} " for i in range(20)]
    fake.token_delay = 0.03
    tokens = [t async for t in stub.Generate(_request(
        mode=pb.DELIVERY_MODE_BATCH, max_delay=Duration(nanos=150_000_000)))]
    assert joined(tokens) == "".join(fake.tokens)
    counts = [t.chunk_count for t in tokens[:-1]]
    # about five tokens are 150 ms old at 30 ms apart; never one message per token
    assert len(tokens) < 10 and max(counts) >= 3, counts


async def test_batch_delivers_held_tokens_before_an_error(stub: GenerationServiceStub,
                                                          fake: FakeOllama) -> None:
    fake.set_fault(Fault(error_after=3, message="boom"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for token in stub.Generate(_request(mode=pb.DELIVERY_MODE_BATCH, max_tokens=10)):
            received.append(token)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert joined(received) == "".join(fake.tokens[:3])


async def test_batch_without_limits_is_invalid(stub: GenerationServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(_request(mode=pb.DELIVERY_MODE_BATCH)):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(info.value)] == ["delivery"]
