"""The hardening rules hold for the OpenAI-compatible backend too: only outages move the
breaker and are retried, a refusal from a live engine never is, error bodies are bounded,
unary calls have a time limit, and undecodable values are typed errors. The same cases as
``test_upstream_verdicts.py``, against ``tests/fakeopenai.py``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import FAST
from tests.fakeopenai import FakeOpenAI, Fault
from tests.helpers import reason
from tokenwire.service import Runtime, build_server
from tokenwire.service.backends._breaker import CircuitBreaker
from tokenwire.service.backends.openai import OpenAIBackend
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

CHAT = ("/v1/chat/completions",)


@contextlib.asynccontextmanager
async def gateway(fake: FakeOpenAI, *, threshold: int = 0, **overrides: Any,
                  ) -> AsyncIterator[tuple[Runtime, GenerationServiceStub, grpc.aio.Channel]]:
    settings = replace(FAST, ollama_url=fake.url, **overrides)
    backend = OpenAIBackend(fake.url + "/v1", name="fake-openai", connect_timeout=2.0,
                            unary_timeout=settings.unary_timeout,
                            breaker=CircuitBreaker(threshold=threshold, cooldown=5.0))
    runtime = await build_server(settings, upstream=backend)
    try:
        async with grpc.aio.insecure_channel(runtime.target) as channel:
            yield runtime, GenerationServiceStub(channel), channel
    finally:
        await runtime.stop(0)


def _posts(fake: FakeOpenAI) -> int:
    return sum(1 for r in fake.requests if r.path == CHAT[0])


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _generate(stub: GenerationServiceStub) -> list[pb.Token]:
    return [t async for t in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                                           timeout=10)]


@pytest.mark.parametrize(("text", "code"), [
    ("1 validation error: max_tokens must be positive", grpc.StatusCode.INVALID_ARGUMENT),
    ("the frobnicator is misaligned", grpc.StatusCode.INTERNAL),
])
async def test_refusals_never_open_the_circuit(text: str, code: grpc.StatusCode) -> None:
    async with FakeOpenAI(dialect="llama-cpp-python") as fake:
        fake.set_fault(Fault(status=500, message=text, times=10, paths=CHAT))
        async with gateway(fake, threshold=2, upstream_retries=2, retry_backoff=0.01) as (
                runtime, stub, channel):
            for _ in range(10):
                err = await _failure(_generate(stub))
                assert err.code() == code and text in (err.details() or "")
            assert _posts(fake) == 10  # none retried
            assert not runtime.upstream.breaker.is_open  # type: ignore[attr-defined]
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            assert (await _generate(stub))[-1].done


@pytest.mark.parametrize("size", [8 << 10, 20 << 20])
async def test_a_huge_error_page_gives_a_short_status(size: int) -> None:
    page = b"<html><body>" + b"bad gateway " * (size // 12) + b"</body></html>"
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault(status=502, error_body=page, content_type="text/html"))
        async with gateway(fake, upstream_retries=2, retry_backoff=0.01) as (_, stub, _c):
            for call in (lambda: _generate(stub),
                         lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10)):
                started = time.monotonic()
                err = await _failure(call())
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert reason(err) == "UPSTREAM_UNAVAILABLE"
                details = err.details() or ""
                assert "<html><body>bad gateway" in details
                assert len(details.encode()) <= 2048
                assert time.monotonic() - started < 5


async def test_unary_calls_have_a_time_limit() -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault(hang=True, paths=("/v1/models", "/v1/embeddings")))
        async with gateway(fake, unary_timeout=0.4) as (runtime, stub, _c):
            started = time.monotonic()
            errors = await asyncio.gather(
                _failure(stub.ListModels(pb.ListModelsRequest())),
                _failure(stub.Embed(pb.EmbedRequest(model="tiny", inputs=["a"]))))
            assert time.monotonic() - started < 2.0
            for err in errors:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert reason(err) == "UPSTREAM_TIMEOUT"
            assert runtime.admission.in_use == 0


async def test_outages_open_the_circuit() -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault(status=502, error_body=b"", paths=CHAT))
        async with gateway(fake, threshold=2, upstream_retries=1, retry_backoff=0.01) as (
                runtime, stub, _c):
            err = await _failure(_generate(stub))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert _posts(fake) == 2  # retried once: an outage
            assert runtime.upstream.breaker.is_open  # type: ignore[attr-defined]
            assert reason(await _failure(_generate(stub))) == "CIRCUIT_OPEN"
