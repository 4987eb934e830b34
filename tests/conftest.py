"""Shared fixtures: a test Ollama on a loopback socket and an in-process
tokenwire server bound to 127.0.0.1:0 in the test's own event loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest

from tests.fakeollama import FakeOllama
from tokenwire.service import Runtime, Settings, build_server
from tokenwire.v1 import generation_pb2_grpc

FAST = Settings(
    listen="127.0.0.1:0",
    connect_timeout=2.0,
    first_token_timeout=10.0,
    idle_timeout=10.0,
    health_interval=0.2,
    shutdown_grace=2.0,
    # Fault tests inject one failure at a time; the breaker and retries have tests of their own.
    breaker_threshold=0,
    upstream_retries=0,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=("tiny:latest", "think-model:latest", "embedder:latest")) as f:
        yield f


MakeRuntime = Callable[..., Awaitable[Runtime]]


@contextlib.asynccontextmanager
async def runtimes(base: Settings) -> AsyncIterator[MakeRuntime]:
    """A factory of in-process servers (in the test's loop) built from ``base`` with
    overrides; all are stopped on exit."""
    built: list[Runtime] = []

    async def make(**overrides: Any) -> Runtime:
        runtime = await build_server(replace(base, **overrides))
        built.append(runtime)
        return runtime

    try:
        yield make
    finally:
        for runtime in built:
            await runtime.stop(0)


@pytest.fixture
async def make_runtime(fake: FakeOllama) -> AsyncIterator[MakeRuntime]:
    """Builds servers against the test Ollama with settings overrides."""
    async with runtimes(replace(FAST, ollama_url=fake.url)) as make:
        yield make


@pytest.fixture
async def runtime(make_runtime: MakeRuntime) -> Runtime:
    return await make_runtime()


@pytest.fixture
async def channel(runtime: Runtime) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(runtime.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(channel)
