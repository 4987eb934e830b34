"""--max-connection-age: an aged connection is replaced (the client reconnects, so a
balancer can send it elsewhere) without cutting the streams that run on it within the
grace; past the grace they end, and resumable ones resume on the new connection."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tests.tcpproxy import tcp_proxy
from tokenwire.client import AsyncClient, Unavailable
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

WORDS = [f"w{i} " for i in range(40)]


async def test_aged_connection_is_replaced_and_its_stream_finishes(
        make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    runtime = await make_runtime(max_connection_age=1.0, max_connection_age_grace=10.0)
    fake.tokens = WORDS
    fake.token_delay = 0.06  # 2.4 s: past the connection's age, inside its grace
    async with tcp_proxy(runtime.target) as proxy, \
            grpc.aio.insecure_channel(proxy.target) as channel:
        stub = GenerationServiceStub(channel)
        tokens = [t async for t in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"))]
        assert "".join(t.text for t in tokens) == "".join(WORDS) and tokens[-1].done
        fake.token_delay = 0.0
        for _ in range(3):  # the next calls go over a new connection
            await stub.Complete(pb.CompleteRequest(generate=pb.GenerateRequest(
                model="tiny", prompt="p")))
        assert proxy.accepted >= 2


async def test_past_the_grace_a_resumable_stream_resumes(make_runtime: MakeRuntime,
                                                         fake: FakeOllama) -> None:
    runtime = await make_runtime(max_connection_age=0.5, max_connection_age_grace=0.5)
    fake.tokens = WORDS
    fake.token_delay = 0.06
    async with tcp_proxy(runtime.target) as proxy:
        async with AsyncClient(proxy.target) as client:
            plain = client.generate("tiny", "p")
            with pytest.raises(Unavailable) as cut:  # a plain stream is cut at the grace
                async for _ in plain:
                    pass
            assert cut.value.partial_text and "".join(WORDS).startswith(cut.value.partial_text)
            stream = client.generate("tiny", "p", resumable=True)
            text = "".join([t.text async for t in stream])
            assert text == "".join(WORDS)
            assert stream.resumes >= 1
        assert proxy.accepted >= 3
