"""Prometheus metrics: what a scrape of ``--metrics-listen`` shows after real calls."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health_pb2_grpc import HealthStub

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tests.helpers import samples, scrape, server_process, value
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

SECRET = "SECRET-PROMPT-TEXT"


@pytest.fixture
async def metered(make_runtime: MakeRuntime) -> Runtime:
    return await make_runtime(metrics_listen="127.0.0.1:0")


async def test_calls_tokens_errors_and_timings_are_counted(metered: Runtime,
                                                           fake: FakeOllama) -> None:
    assert metered.metrics_port is not None
    async with grpc.aio.insecure_channel(metered.target) as channel:
        stub = GenerationServiceStub(channel)
        streamed = [t async for t in stub.Generate(pb.GenerateRequest(model="tiny",
                                                                      prompt=SECRET))]
        unary = await stub.Complete(pb.CompleteRequest(
            chat=pb.ChatRequest(model="tiny", messages=[pb.Message(role=pb.ROLE_USER,
                                                                   content=SECRET)])))
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [t async for t in stub.Generate(pb.GenerateRequest(model="missing", prompt="p"))]
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [t async for t in stub.Chat(pb.ChatRequest(model=""))]  # no model
        await stub.ListModels(pb.ListModelsRequest())

    response = await scrape(metered.metrics_port)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert SECRET not in response.text and "tiny" not in response.text  # no text, no models
    found = samples(response.text)
    rpcs = "tokenwire_rpcs_total"
    assert value(found, rpcs, method="Generate", code="OK") == 1
    assert value(found, rpcs, method="Generate", code="NOT_FOUND") == 1
    assert value(found, rpcs, method="Chat", code="INVALID_ARGUMENT") == 1
    assert value(found, rpcs, method="Complete", code="OK") == 1
    assert value(found, rpcs, method="ListModels", code="OK") == 1
    errors = "tokenwire_rpc_errors_total"
    assert value(found, errors, method="Generate", reason="MODEL_NOT_FOUND") == 1
    assert value(found, errors, method="Chat", reason="INVALID_REQUEST") == 1
    # Ollama's own counts, as the callers received them in Usage
    usages = [streamed[-1].usage, unary.usage]
    assert value(found, "tokenwire_tokens_total", kind="completion") == sum(
        u.completion_tokens for u in usages) > 0
    assert value(found, "tokenwire_tokens_total", kind="prompt") == sum(
        u.prompt_tokens for u in usages) > 0
    ttft = "tokenwire_time_to_first_token_seconds"
    assert value(found, ttft + "_count", method="Generate") == 1
    assert value(found, ttft + "_sum", method="Generate") == pytest.approx(
        streamed[-1].usage.time_to_first_token.ToNanoseconds() / 1e9)
    assert value(found, ttft + "_count", method="Complete") == 1
    assert value(found, "tokenwire_rpc_duration_seconds_count", method="Generate") == 2
    assert value(found, "tokenwire_model_calls_in_flight") == 0
    assert value(found, "tokenwire_upstream_up", upstream="ollama") == 1


async def test_in_flight_and_upstream_up_follow_the_state(metered: Runtime,
                                                          fake: FakeOllama) -> None:
    assert metered.metrics_port is not None
    fake.token_delay = 0.2
    async with grpc.aio.insecure_channel(metered.target) as channel:
        call = GenerationServiceStub(channel).Generate(pb.GenerateRequest(model="tiny",
                                                                          prompt="p"))
        await call.read()
        found = samples((await scrape(metered.metrics_port)).text)
        assert value(found, "tokenwire_model_calls_in_flight") == 1
        call.cancel()
    await fake.wait_for_disconnect(timeout=5)
    await fake.go_down()
    await metered.health.check_once()
    found = samples((await scrape(metered.metrics_port)).text)
    assert value(found, "tokenwire_upstream_up", upstream="ollama") == 0
    assert value(found, "tokenwire_rpcs_total", method="Generate", code="CANCELLED") == 1
    assert value(found, "tokenwire_model_calls_in_flight") == 0


async def test_endpoint_speaks_openmetrics_and_refuses_other_paths(metered: Runtime) -> None:
    assert metered.metrics_port is not None
    openmetrics = await scrape(metered.metrics_port,
                               accept="application/openmetrics-text; version=1.0.0")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    missing = await scrape(metered.metrics_port, "/")
    assert missing.status_code == 404 and "/metrics" in missing.text


async def test_metrics_are_off_unless_asked_for(runtime: Runtime) -> None:
    assert runtime.metrics_port is None


async def test_a_metrics_port_in_use_stops_the_start_with_a_clear_error(
        fake: FakeOllama) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with server_process(fake.url, "--metrics-listen", f"127.0.0.1:{port}",
                                  ready=False) as server:
            assert await server.exited() == 2
    assert (f"cannot listen on 127.0.0.1:{port} (--metrics-listen): the address is in use by "
            f"pid {os.getpid()}") in server.output
    assert "Traceback" not in server.output


async def test_logs_and_metrics_name_a_call_alike(make_runtime: MakeRuntime,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The access log and the metrics use one vocabulary: the bare method name, the status
    code's name and the ErrorInfo reason (not a Python class name)."""
    with socket.socket() as closed:  # a port nothing listens on: the engine is down
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    runtime = await make_runtime(metrics_listen="127.0.0.1:0", ollama_url=down)
    assert runtime.metrics_port is not None
    caplog.set_level("INFO", "tokenwire")
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [t async for t in GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(model="tiny", prompt="p"),
                metadata=(("x-request-id", "vocab-1"),))]
        health = HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest())

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "tokenwire.access"
                and getattr(r, "fields", {}).get("request_id") == "vocab-1"]

    for _ in range(500):  # the access line is written as the handler ends, after the status
        if logged():
            break
        await asyncio.sleep(0.01)
    [access] = logged()
    fields = access.fields  # type: ignore[attr-defined]
    assert {k: fields[k] for k in ("method", "outcome", "reason")} == {
        "method": "Generate", "outcome": "UNAVAILABLE", "reason": "UPSTREAM_UNREACHABLE"}
    assert ("method=Generate rid=vocab-1 caller=peer:127.0.0.1 outcome=UNAVAILABLE "
            "reason=UPSTREAM_UNREACHABLE ms=") in access.getMessage()
    found = samples((await scrape(runtime.metrics_port)).text)
    assert value(found, "tokenwire_rpc_errors_total", method="Generate",
                 reason="UPSTREAM_UNREACHABLE") == 1
    assert value(found, "tokenwire_rpcs_total", method="Check", code="OK") == 1
    assert not [key for key in found if any(k == "method" and "/" in v for k, v in key[1])]
