"""Several replicas behind one client target: round robin, and gRPC's own retry of a call
that failed before its first token (``--initial-metadata``), with real server processes.

The replicas: ``bad`` runs but cannot reach its engine (every model call ends
UNAVAILABLE before a token), ``stopped`` is an address nobody listens on, and ``good1``,
``good2`` each have a test Ollama of their own, so what each one served is counted
exactly by its engine's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from tests.fakeollama import DEFAULT_TOKENS, FakeOllama, Fault
from tests.helpers import ServerProcess, server_process
from tokenwire.client import AsyncClient, Client, Unavailable
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

CALLS = 12


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _generations(fake: FakeOllama) -> int:
    return sum(r.path == "/api/generate" for r in fake.requests)


@dataclass
class Replicas:
    bad: ServerProcess
    good: list[ServerProcess]
    fakes: list[FakeOllama]
    stopped: str

    def served(self) -> list[int]:
        return [_generations(fake) for fake in self.fakes]


@contextlib.asynccontextmanager
async def replicas(goods: int, *flags: str) -> AsyncIterator[Replicas]:
    async with contextlib.AsyncExitStack() as stack:
        fakes = [await stack.enter_async_context(FakeOllama()) for _ in range(goods)]
        # Upstream retries off: the bad replica answers at once (and its breaker stays
        # closed: every refusal is UPSTREAM_UNREACHABLE).
        bad = await stack.enter_async_context(server_process(
            f"http://127.0.0.1:{_closed_port()}", *flags, "--upstream-retries", "0",
            "--breaker-threshold", "0"))
        good = [await stack.enter_async_context(server_process(fake.url, *flags))
                for fake in fakes]
        yield Replicas(bad, good, fakes, f"127.0.0.1:{_closed_port()}")


async def _generate(client: AsyncClient, rid: str) -> str:
    stream = client.generate("tiny", "Why is the sky blue?", metadata={"x-request-id": rid})
    async for _ in stream:
        pass
    return stream.text


async def test_a_list_target_retries_what_failed_before_a_token_on_another_replica() -> None:
    """Default order (first-token) and the client's default service config: every call
    succeeds although a third of them first reach the replica without an engine; round
    robin spreads them over both good replicas; nothing is generated twice."""
    async with replicas(2) as r:
        # Round robin alone: calls alternate over the good replicas.
        async with AsyncClient(",".join(g.target for g in r.good)) as client:
            for i in range(8):
                await _generate(client, f"spread-{i}")
        # (the first call may come while only one connection is up)
        assert sum(r.served()) == 8 and min(r.served()) >= 3, r.served()
        spread = r.served()
        targets = [r.bad.target, r.stopped, *(g.target for g in r.good)]
        async with AsyncClient(targets) as client:
            assert client.target == "ipv4:" + ",".join(targets)
            answers = [await _generate(client, f"retry-{i}") for i in range(CALLS)]
            assert answers == ["".join(DEFAULT_TOKENS)] * CALLS
            served = [n - m for n, m in zip(r.served(), spread, strict=True)]
            assert sum(served) == CALLS  # one generation per call: none was repeated
            assert min(served) >= 1, served  # both good replicas took calls
            # The bad replica refused attempts that gRPC then sent elsewhere.
            line = await r.bad.wait_for("outcome=UNAVAILABLE")
            rid = line.split("rid=")[1].split()[0]
            assert rid.startswith("retry-")

            # Unary calls too: their headers come with their answer.
            for _ in range(4):
                assert [m.name for m in await client.list_models()] == ["tiny:latest"]

            # A failure after a token is final: no retry, no token delivered twice.
            for fake in r.fakes:
                fake.set_fault(Fault(drop_after=2, times=1))
            before = sum(r.served())
            stream = client.generate("tiny", "p")
            with pytest.raises(Unavailable) as caught:
                async for _ in stream:
                    pass
            assert caught.value.partial_text == "".join(DEFAULT_TOKENS[:2])
            assert sum(r.served()) == before + 1
            # Complete too: its headers go out when its first token is generated. Armed
            # again on both engines: the stream used one of them, and round robin may send
            # this call to either.
            for fake in r.fakes:
                fake.set_fault(Fault(drop_after=2, times=1))
            with pytest.raises(Unavailable):
                await client.complete("tiny", "p")
            assert sum(r.served()) == before + 2


async def test_headers_sent_early_rule_out_the_retry() -> None:
    """The other order (--initial-metadata early): the same calls fail whenever they first
    reach the bad replica, because the client committed them when their headers came."""
    async with replicas(1, "--initial-metadata", "early") as r:
        async with AsyncClient([r.bad.target, r.good[0].target]) as client:
            failed: list[str] = []
            for i in range(CALLS):
                try:
                    await _generate(client, f"early-{i}")
                except Unavailable as exc:
                    assert exc.request_id == f"early-{i}"
                    failed.append(f"early-{i}")
            assert failed
            assert r.served() == [CALLS - len(failed)]  # none went on to the good one
            for rid in failed:
                assert "outcome=UNAVAILABLE" in await r.bad.wait_for(f"rid={rid} caller=")
            outcomes = []
            for _ in range(4):  # unary calls: their headers went out before the answer
                try:
                    outcomes.append(bool(await client.list_models()))
                except Unavailable:
                    outcomes.append(False)
            assert False in outcomes


async def test_without_the_service_config_there_is_no_retry() -> None:
    """``service_config=None`` (gRPC's defaults): pick_first and no retry policy, so the
    first address, the bad replica, fails every call; the sync twin shares the config (it
    runs in a thread: the test Ollama lives in this event loop)."""
    async with replicas(1) as r:
        bad, good = r.bad.target, r.good[0].target

        def without() -> None:
            with Client([bad, good], service_config=None) as client:
                for _ in range(2):
                    with pytest.raises(Unavailable):
                        client.complete("tiny", "p")

        def with_default() -> list[str]:
            with Client(f"{bad},{good}") as client:
                return [client.complete("tiny", "p").text for _ in range(4)]

        await asyncio.to_thread(without)
        assert r.served() == [0]
        assert await asyncio.to_thread(with_default) == ["".join(DEFAULT_TOKENS)] * 4
        assert r.served() == [4]


@pytest.mark.parametrize("order", ["first-token", "early"])
async def test_request_id_reaches_the_caller_in_both_orders(order: str) -> None:
    """x-request-id: in the headers of a call that streams, in the trailers always; an
    error before a token (the engine's, or a refusal of the request) is trailers-only in
    the first-token order."""
    async with replicas(1, "--initial-metadata", order) as r:
        async with grpc.aio.insecure_channel(r.good[0].target) as channel:
            call = GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(model="tiny", prompt="p"), metadata=(("x-request-id", "ok-1"),))
            assert ("x-request-id", "ok-1") in tuple(await call.initial_metadata())
            assert [t async for t in call][-1].done
            assert ("x-request-id", "ok-1") in tuple(await call.trailing_metadata())
            call = GenerationServiceStub(channel).Generate(  # refused before any work
                pb.GenerateRequest(model="", prompt="p"), metadata=(("x-request-id", "inv-1"),))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [t async for t in call]
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("x-request-id", "inv-1") in tuple(caught.value.trailing_metadata())
            if order == "first-token":  # trailers-only (early: headers, which grpc.aio
                # may not show for a call that failed at once, so not checked)
                assert tuple(caught.value.initial_metadata()) == ()
        async with grpc.aio.insecure_channel(r.bad.target) as channel:
            call = GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(model="tiny", prompt="p"),
                metadata=(("x-request-id", "bad-1"),))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [t async for t in call]
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ("x-request-id", "bad-1") in tuple(caught.value.trailing_metadata())
            if order == "first-token":
                assert tuple(caught.value.initial_metadata()) == ()
