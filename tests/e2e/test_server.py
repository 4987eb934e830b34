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


async def test_health_follows_upstream(channel: grpc.aio.Channel, fake: FakeOllama) -> None:
    assert SERVICE_NAME == "tokenwire.v1.GenerationService"
    for service in ("", SERVICE_NAME):
        assert await _status(channel, service) == SERVING
    await fake.go_down()
    for service in ("", SERVICE_NAME):
        await _wait_status(channel, service, NOT_SERVING)
    await fake.come_up()
    for service in ("", SERVICE_NAME):
        await _wait_status(channel, service, SERVING)


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
    assert access["method"] == "/tokenwire.v1.GenerationService/Generate"
    assert access["outcome"] == "OK" and access["ms"] > 0
    assert access["caller"] == "peer:127.0.0.1"
    assert "SECRET" not in server.output
