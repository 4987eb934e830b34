"""Health, reflection, logging and the server process."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tests.helpers import server_process
from tokenwire.service import SERVICE_NAME, Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def _wait_status(channel: grpc.aio.Channel, service: str, want: int) -> None:
    for _ in range(100):
        if await _status(channel, service) == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"health of {service!r} never became {want}")


READINESS = ("", SERVICE_NAME, "readiness")


async def test_health_follows_upstream(channel: grpc.aio.Channel, fake: FakeOllama) -> None:
    assert SERVICE_NAME == "tokenwire.v1.GenerationService"
    for service in READINESS:
        assert await _status(channel, service) == SERVING
    await fake.go_down()
    for service in READINESS:
        await _wait_status(channel, service, NOT_SERVING)
    await fake.come_up()
    for service in READINESS:
        await _wait_status(channel, service, SERVING)


async def test_liveness_stays_serving_while_ollama_is_down(channel: grpc.aio.Channel,
                                                           fake: FakeOllama) -> None:
    """A liveness probe that followed Ollama would have Kubernetes restart every healthy
    gateway during an Ollama outage: only readiness follows it."""
    assert await _status(channel, "liveness") == SERVING
    await fake.go_down()
    for service in READINESS:
        await _wait_status(channel, service, NOT_SERVING)
    for _ in range(5):  # several probe intervals later, still alive
        assert await _status(channel, "liveness") == SERVING
        await asyncio.sleep(0.2)
    await fake.come_up()
    await _wait_status(channel, "readiness", SERVING)
    assert await _status(channel, "liveness") == SERVING


async def test_shutdown_turns_liveness_and_readiness_not_serving(
        make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    """From the first moment of Runtime.stop, while a stream still drains, both answer
    NOT_SERVING, on the main port and on --health-listen; the health port closes last."""
    runtime = await make_runtime(health_listen="127.0.0.1:0", shutdown_grace=5.0)
    assert runtime.health_target is not None
    fake.tokens = [f"t{i} " for i in range(40)]
    fake.token_delay = 0.05  # ~2 s: the drain outlasts the checks below
    async with grpc.aio.insecure_channel(runtime.health_target) as probe, \
            grpc.aio.insecure_channel(runtime.target) as channel:
        for service in ("liveness", *READINESS):
            assert await _status(probe, service) == SERVING
        call = GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(model="tiny", prompt="p"), timeout=10)
        first = await call.read()
        stopping = asyncio.create_task(runtime.stop())
        await _wait_status(probe, "liveness", NOT_SERVING)
        assert not stopping.done()  # still draining
        for service in READINESS:
            assert await _status(probe, service) == NOT_SERVING
        rest = []
        while (token := await call.read()) is not grpc.aio.EOF:
            rest.append(token)
        await stopping
        assert rest[-1].done and "".join(t.text for t in [first, *rest]) == "".join(fake.tokens)
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await _status(probe, "liveness")
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_port_needs_no_credentials_and_serves_health_only(
        make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """kubelet's gRPC probe sends no metadata: --health-listen answers it without a
    token while the main port asks for one, and serves nothing but health."""
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", "ops=tw-ops-31337")
    runtime = await make_runtime(health_listen="127.0.0.1:0")
    assert runtime.health_target is not None
    assert runtime.health_target != runtime.target
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _status(channel, "liveness")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(runtime.health_target) as probe:
        for service in ("liveness", *READINESS):
            assert await _status(probe, service) == SERVING
        watch = health_pb2_grpc.HealthStub(probe).Watch(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
        assert (await watch.read()).status == SERVING
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _status(probe, "no-such-service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # Nothing else: no model calls, no reflection.
        with pytest.raises(grpc.aio.AioRpcError) as generate:
            async for _ in GenerationServiceStub(probe).Generate(
                    pb.GenerateRequest(model="tiny", prompt="p"), timeout=5):
                pass
        assert generate.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await _list_services(probe)
        assert listing.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def _list_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(requests(), timeout=5):
        names |= {s.name for s in response.list_services_response.service}
    return names


async def test_health_not_serving_on_shutdown(runtime: Runtime) -> None:
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        assert await _status(channel, "") == SERVING
        await runtime.health.shutdown()
        assert await _status(channel, "") == NOT_SERVING


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


async def test_logs_never_contain_prompt_or_answer(stub: GenerationServiceStub, fake: FakeOllama,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake.tokens = ["SECRET-ANSWER-", "TEXT"]
    tokens = [t async for t in stub.Generate(pb.GenerateRequest(
        model="tiny", prompt="SECRET-PROMPT-TEXT"), metadata=(("x-request-id", "rid-7"),))]
    assert tokens[-1].done
    fake.set_fault(None)
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in stub.Generate(pb.GenerateRequest(model="nope", prompt="SECRET-PROMPT")):
            pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "rid-7" in text  # the access log is there ...
    assert "SECRET" not in text  # ... without prompt or answer text


async def test_server_process_prints_config_and_stops_cleanly_on_sigterm(
    fake: FakeOllama,
) -> None:
    async with server_process(fake.url, TOKENWIRE_SHUTDOWN_GRACE="2") as server:
        assert fake.url in server.output and "first_token_timeout" in server.output
        async with grpc.aio.insecure_channel(server.target) as channel:
            tokens = [t async for t in GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(model="tiny", prompt="p"))]
            assert tokens[-1].done
        assert await server.stop() == 0, server.output
        assert "stopped" in server.output


async def test_json_logs_are_one_object_per_line_with_the_access_fields(
    fake: FakeOllama,
) -> None:
    fake.tokens = ["SECRET-ANSWER-", "TEXT"]
    async with server_process(fake.url, "--log-format", "json",
                              TOKENWIRE_SHUTDOWN_GRACE="2") as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            tokens = [t async for t in GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(model="tiny", prompt="SECRET-PROMPT-TEXT"),
                metadata=(("x-request-id", "json-1"),))]
            assert tokens[-1].done
        assert await server.stop() == 0, server.output
    # Every line is a JSON object, but for gRPC C-core's own (rare) lines, which it writes
    # to stderr itself ("I1201 12:00:00.000000 ...").
    lines = [line for line in server.lines
             if line.strip() and not re.match(r"[IWEF]\d{4} \d\d:\d\d", line)]
    records = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    config = next(r for r in records if r["message"] == "configuration")
    assert config["settings"]["ollama_url"] == fake.url
    assert config["settings"]["log_format"] == "json"
    access = next(r for r in records if r.get("request_id") == "json-1")
    assert access["logger"] == "tokenwire.access"
    assert access["method"] == "Generate"  # the bare name, as the metrics label it
    assert access["outcome"] == "OK" and access["ms"] > 0
    assert access["caller"] == "peer:127.0.0.1"
    assert "SECRET" not in server.output
