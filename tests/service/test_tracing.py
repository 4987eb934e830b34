"""Tracing in process: the spans of calls (the SDK's in-memory exporter stands in for
OTLP; tests/e2e/test_tracing.py exports to a real collector), their parents, their
GenAI attributes, the traceparent sent upstream, and tracing off."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import FAST, MakeRuntime, runtimes
from tests.fakeollama import FakeOllama, Fault
from tests.fakeopenai import FakeOpenAI
from tokenwire.service import Runtime, build_server, parse_settings
from tokenwire.service.backends.openai import OpenAIBackend
from tokenwire.service.tracing import _otel
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{CALLER_SPAN}-01"
SECRET = "the-prompt-no-span-may-carry"


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Every server built in the test exports here instead of over OTLP."""
    memory = InMemorySpanExporter()
    monkeypatch.setattr(_otel, "OTLPSpanExporter", lambda endpoint: memory)
    yield memory


@pytest.fixture
async def traced(make_runtime: MakeRuntime, exported: InMemorySpanExporter
                 ) -> AsyncIterator[tuple[Runtime, GenerationServiceStub]]:
    runtime = await make_runtime(otlp_endpoint="http://127.0.0.1:9")
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        yield runtime, GenerationServiceStub(channel)


async def _spans(runtime: Runtime, memory: InMemorySpanExporter, count: int
                 ) -> list[ReadableSpan]:
    """The spans exported, once there are ``count`` of them: a call's span ends just after
    its status went out (a failed call's as soon as it aborts)."""
    assert runtime.tracing is not None
    for _ in range(500):
        runtime.tracing.provider.force_flush()
        if len(memory.get_finished_spans()) >= count:
            break
        await asyncio.sleep(0.01)
    return list(memory.get_finished_spans())


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _no_text(spans: list[ReadableSpan], *texts: str) -> None:
    """No span, event or resource holds any of ``texts``."""
    dumped = "".join(span.to_json() for span in spans)
    for text in texts:
        assert text not in dumped


async def test_a_call_continues_the_callers_trace(
        traced: tuple[Runtime, GenerationServiceStub], exported: InMemorySpanExporter,
        fake: FakeOllama) -> None:
    runtime, stub = traced
    fake.tokens = ["alpha ", "beta ", "gamma"]
    tokens = [t async for t in stub.Chat(pb.ChatRequest(
        model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content=SECRET)],
        options=pb.Options(max_tokens=50, temperature=0.25, top_k=7)),
        metadata=(("traceparent", TRACEPARENT), ("tracestate", "vendor=v1")))]
    final = tokens[-1]
    spans = await _spans(runtime, exported, 2)
    server = _one(spans, "tokenwire.v1.GenerationService/Chat")
    gen = _one(spans, "chat tiny")
    # The caller's trace, the caller's span as parent; the GenAI span under the call's.
    assert f"{server.context.trace_id:032x}" == TRACE
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert server.kind is SpanKind.SERVER and gen.kind is SpanKind.CLIENT
    assert gen.context.trace_id == server.context.trace_id
    assert gen.parent is not None and gen.parent.span_id == server.context.span_id
    assert _attrs(server) | {"tokenwire.request_id": None} == {
        "rpc.system.name": "grpc", "rpc.method": "tokenwire.v1.GenerationService/Chat",
        "rpc.system": "grpc", "rpc.service": "tokenwire.v1.GenerationService",
        "rpc.response.status_code": "OK", "rpc.grpc.status_code": 0,
        "tokenwire.caller": "peer:127.0.0.1", "tokenwire.request_id": None}
    attrs = _attrs(gen)
    ttfc = attrs.pop("gen_ai.response.time_to_first_chunk")
    assert 0 < ttfc < 5
    assert attrs == {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "tiny",
        "gen_ai.request.max_tokens": 50, "gen_ai.request.temperature": 0.25,
        "gen_ai.request.top_k": 7, "gen_ai.provider.name": "ollama",
        "server.address": "127.0.0.1", "server.port": fake.port,
        "tokenwire.upstream": runtime.router.upstreams[0].name, "tokenwire.attempts": 1,
        "gen_ai.usage.input_tokens": final.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": final.usage.completion_tokens,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.response.model": final.model}
    assert final.usage.completion_tokens == 3 and final.usage.prompt_tokens > 0
    assert [e.name for e in gen.events] == ["tokenwire.first_token"]
    assert gen.start_time < gen.events[0].timestamp < gen.end_time  # type: ignore[operator]
    # The engine got the GenAI span's context, and the caller's tracestate.
    sent = fake.requests[-1].headers
    assert sent["traceparent"] == f"00-{TRACE}-{gen.context.span_id:016x}-01"
    assert sent["tracestate"] == "vendor=v1"
    _no_text(spans, SECRET, "alpha", "beta", "gamma")


@pytest.mark.parametrize("metadata", [(), (("traceparent", "00-not-a-trace-id-01"),),
                                      (("traceparent", f"00-{'0' * 32}-{CALLER_SPAN}-01"),)])
async def test_without_a_valid_traceparent_a_call_starts_a_trace(
        traced: tuple[Runtime, GenerationServiceStub], exported: InMemorySpanExporter,
        fake: FakeOllama, metadata: tuple[tuple[str, str], ...]) -> None:
    runtime, stub = traced
    response = await stub.Complete(pb.CompleteRequest(
        generate=pb.GenerateRequest(model="tiny", prompt=SECRET)), metadata=metadata)
    spans = await _spans(runtime, exported, 2)
    server = _one(spans, "tokenwire.v1.GenerationService/Complete")
    gen = _one(spans, "text_completion tiny")
    assert server.parent is None
    assert gen.parent is not None and gen.parent.span_id == server.context.span_id
    assert _attrs(gen)["gen_ai.usage.output_tokens"] == response.usage.completion_tokens
    assert fake.requests[-1].headers["traceparent"].split("-")[1] == (
        f"{server.context.trace_id:032x}")
    _no_text(spans, SECRET, response.text)


async def test_an_unsampled_caller_is_not_recorded(
        traced: tuple[Runtime, GenerationServiceStub], exported: InMemorySpanExporter,
        fake: FakeOllama) -> None:
    """The default sampler follows the caller's sampled flag: nothing is exported, and
    the engine is told the trace is not sampled."""
    runtime, stub = traced
    await stub.Complete(pb.CompleteRequest(generate=pb.GenerateRequest(model="tiny",
                                                                       prompt="p")),
                        metadata=(("traceparent", f"00-{TRACE}-{CALLER_SPAN}-00"),))
    assert await _spans(runtime, exported, 0) == []
    version, trace, _, flags = fake.requests[-1].headers["traceparent"].split("-")
    assert (version, trace, flags) == ("00", TRACE, "00")


async def test_a_failover_is_one_span_with_its_attempts(
        exported: InMemorySpanExporter, fake: FakeOllama, tmp_path: Path) -> None:
    """gpu1 answers 503, the call moves to gpu2: one GenAI span, both attempts under it,
    the second upstream's address on it, and both engines sent its traceparent."""
    async with FakeOllama(models=("tiny:latest",)) as other:
        path = tmp_path / "upstreams.toml"
        path.write_text(f'[upstreams.gpu1]\nkind = "ollama"\nurl = "{fake.url}"\n'
                        'models = ["*"]\n\n'
                        f'[upstreams.gpu2]\nkind = "ollama"\nurl = "{other.url}"\n'
                        'models = ["*"]\npriority = 1\n')
        fake.fault = Fault(status=503, message="busy", times=1)
        async with runtimes(replace(FAST, upstreams_file=str(path),
                                    otlp_endpoint="http://127.0.0.1:9")) as make:
            runtime = await make()
            async with grpc.aio.insecure_channel(runtime.target) as channel:
                tokens = [t async for t in GenerationServiceStub(channel).Generate(
                    pb.GenerateRequest(model="tiny", prompt=SECRET),
                    metadata=(("traceparent", TRACEPARENT),))]
            spans = await _spans(runtime, exported, 2)
    assert tokens[-1].usage.attempts == 2
    gen = _one(spans, "text_completion tiny")
    attrs = _attrs(gen)
    assert (attrs["tokenwire.attempts"], attrs["tokenwire.upstream"], attrs["server.port"]) == (
        2, "gpu2", other.port)
    assert [(e.name, dict(e.attributes or {}).get("tokenwire.upstream"))
            for e in gen.events] == [("tokenwire.retry", "gpu2"), ("tokenwire.first_token", None)]
    parent = f"00-{TRACE}-{gen.context.span_id:016x}-01"
    generations = [r for r in fake.requests + other.requests if r.path == "/api/generate"]
    assert [r.headers["traceparent"] for r in generations] == [parent, parent]


async def test_embeddings(traced: tuple[Runtime, GenerationServiceStub],
                          exported: InMemorySpanExporter, fake: FakeOllama) -> None:
    runtime, stub = traced
    response = await stub.Embed(pb.EmbedRequest(model="embedder", inputs=[SECRET]),
                                metadata=(("traceparent", TRACEPARENT),))
    spans = await _spans(runtime, exported, 2)
    gen = _one(spans, "embeddings embedder")
    assert _attrs(gen)["gen_ai.usage.input_tokens"] == response.prompt_tokens > 0
    assert _attrs(gen)["gen_ai.operation.name"] == "embeddings"
    assert fake.requests[-1].path == "/api/embed"
    assert fake.requests[-1].headers["traceparent"].split("-")[1] == TRACE
    _no_text(spans, SECRET)


async def test_a_failed_call(traced: tuple[Runtime, GenerationServiceStub],
                             exported: InMemorySpanExporter, fake: FakeOllama) -> None:
    runtime, stub = traced
    fake.fault = Fault(status=503, message="overloaded")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Generate(pb.GenerateRequest(model="tiny", prompt=SECRET),
                                     metadata=(("traceparent", TRACEPARENT),)):
            pass
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    spans = await _spans(runtime, exported, 2)
    server = _one(spans, "tokenwire.v1.GenerationService/Generate")
    gen = _one(spans, "text_completion tiny")
    assert server.status.status_code is StatusCode.ERROR
    assert _attrs(server)["error.type"] == "UNAVAILABLE"
    assert _attrs(server)["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert _attrs(server)["tokenwire.error.reason"]
    assert gen.status.status_code is StatusCode.ERROR
    assert _attrs(gen)["error.type"] == "UpstreamBusy"
    assert "gen_ai.usage.output_tokens" not in _attrs(gen)
    _no_text(spans, SECRET)


async def test_cancelled_calls_end_their_spans(
        traced: tuple[Runtime, GenerationServiceStub], exported: InMemorySpanExporter,
        fake: FakeOllama) -> None:
    """Callers that go away mid-stream: every call still ends both its spans."""
    runtime, stub = traced
    fake.tokens = [f"t{i} " for i in range(100)]
    fake.token_delay = 0.02

    async def cancelled() -> None:
        call = stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"))
        with contextlib.suppress(asyncio.CancelledError):
            async for _ in call:
                call.cancel()

    await asyncio.gather(*(cancelled() for _ in range(20)))
    for record in fake.streams:  # the engine saw each cancel
        await asyncio.wait_for(record.disconnected.wait(), 10)
    spans = await _spans(runtime, exported, 40)
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    gens = [s for s in spans if s.name == "text_completion tiny"]
    assert len(servers) == len(gens) == 20
    assert {_attrs(s)["rpc.response.status_code"] for s in servers} == {"CANCELLED"}
    assert {_attrs(s)["error.type"] for s in gens} == {"CancelledError"}


async def test_a_refused_call_is_no_server_failure(
        traced: tuple[Runtime, GenerationServiceStub], exported: InMemorySpanExporter) -> None:
    runtime, stub = traced
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Generate(pb.GenerateRequest(model="", prompt=SECRET)):
            pass
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    spans = await _spans(runtime, exported, 1)
    server = _one(spans, "tokenwire.v1.GenerationService/Generate")
    assert _attrs(server)["rpc.response.status_code"] == "INVALID_ARGUMENT"
    assert server.status.status_code is StatusCode.UNSET and "error.type" not in _attrs(server)
    assert [s.name for s in spans] == [server.name]  # no model call, no GenAI span


async def test_a_resume_links_to_the_generation(
        traced: tuple[Runtime, GenerationServiceStub], exported: InMemorySpanExporter) -> None:
    runtime, stub = traced
    first = [t async for t in stub.Generate(
        pb.GenerateRequest(model="tiny", prompt=SECRET, resumable=pb.Resumable()),
        metadata=(("traceparent", TRACEPARENT),))]
    other = "1af7651916cd43dd8448eb211c80319c"
    [t async for t in stub.Resume(
        pb.ResumeRequest(stream_id=first[0].stream_id, after=first[-1].position),
        metadata=(("traceparent", f"00-{other}-{CALLER_SPAN}-01"),))]
    spans = await _spans(runtime, exported, 3)
    gen = _one(spans, "text_completion tiny")
    resume = _one(spans, "tokenwire.v1.GenerationService/Resume")
    assert gen.parent is not None and f"{gen.context.trace_id:032x}" == TRACE
    assert _attrs(gen)["tokenwire.resumable"] is True
    assert f"{resume.context.trace_id:032x}" == other
    assert [(link.context.trace_id, link.context.span_id) for link in resume.links] == [
        (gen.context.trace_id, gen.context.span_id)]


async def test_off_by_default(runtime: Runtime, stub: GenerationServiceStub,
                              fake: FakeOllama) -> None:
    assert runtime.tracing is None
    [t async for t in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                                    metadata=(("traceparent", TRACEPARENT),))]
    assert "traceparent" not in fake.requests[-1].headers


async def test_a_collector_that_is_down_does_not_hold_a_stop(
        make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    """Spans for a collector nobody listens for: calls are served, and stopping the server
    gives the exporter 3 s (the SDK alone would wait up to 30)."""
    runtime = await make_runtime(otlp_endpoint=f"http://127.0.0.1:{_closed_port()}")
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        for _ in range(3):
            await GenerationServiceStub(channel).Complete(pb.CompleteRequest(
                generate=pb.GenerateRequest(model="tiny", prompt="p")))
    started = time.monotonic()
    await runtime.stop(0)
    assert time.monotonic() - started < 5


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_off_loads_no_opentelemetry() -> None:
    """A server built with tracing off imports none of the tracing code: no tracer, no
    exporter. (redis-py, when the OpenTelemetry SDK is installed, imports its metrics
    part and the tracing API for its own optional instrumentation: not ours.)"""
    code = ("import sys, asyncio\n"
            "from tokenwire.service import Settings, build_server\n"
            "async def main():\n"
            "    r = await build_server(Settings(listen='127.0.0.1:0', "
            "ollama_url='http://127.0.0.1:9'))\n"
            "    await r.stop(0)\n"
            "asyncio.run(main())\n"
            "print(sorted(m for m in sys.modules if m.startswith(("
            "'opentelemetry.sdk.trace', 'opentelemetry.exporter', "
            "'tokenwire.service.tracing._'))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_endpoint_from_flag_and_environment() -> None:
    assert parse_settings([], {}).otlp_endpoint == ""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert parse_settings([], env).otlp_endpoint == "http://collector:4317"
    assert parse_settings([], env | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317"}
                          ).otlp_endpoint == "http://t:4317"
    assert parse_settings([], env | {"OTEL_SDK_DISABLED": "true"}).otlp_endpoint == ""
    assert parse_settings(["--otlp-endpoint", "https://c:4317"], env
                          ).otlp_endpoint == "https://c:4317"


@pytest.mark.parametrize(("argv", "env", "says"), [
    (["--otlp-endpoint", "collector:4317"], {}, "needs its scheme"),
    ([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "OTLP/gRPC only"),
])
def test_bad_tracing_settings(argv: list[str], env: dict[str, str], says: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, env)
    assert says in capsys.readouterr().err


async def test_the_openai_compatible_wire(exported: InMemorySpanExporter) -> None:
    async with FakeOpenAI(dialect="openai", models=("tiny",)) as fake:
        backend = OpenAIBackend(fake.url + "/v1", api_key="sk-test-secret", name="hosted",
                                connect_timeout=2.0)
        runtime = await build_server(replace(FAST, otlp_endpoint="http://127.0.0.1:9"),
                                     upstream=backend)
        try:
            async with grpc.aio.insecure_channel(runtime.target) as channel:
                tokens = [t async for t in GenerationServiceStub(channel).Chat(
                    pb.ChatRequest(model="tiny", messages=[
                        pb.Message(role=pb.ROLE_USER, content=SECRET)]),
                    metadata=(("traceparent", TRACEPARENT),))]
            spans = await _spans(runtime, exported, 2)
        finally:
            await runtime.stop(0)
    gen = _one(spans, "chat tiny")
    usage = tokens[-1].usage
    assert _attrs(gen)["gen_ai.provider.name"] == "openai"
    assert _attrs(gen)["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
    assert _attrs(gen)["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
    sent = [r for r in fake.requests if r.path == "/v1/chat/completions"][-1].headers
    assert sent["traceparent"] == f"00-{TRACE}-{gen.context.span_id:016x}-01"
    _no_text(spans, SECRET, "sk-test-secret", "".join(t.text for t in tokens))


async def test_health_checks_get_no_span(
        traced: tuple[Runtime, GenerationServiceStub], exported: InMemorySpanExporter) -> None:
    runtime, _ = traced
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=(("traceparent", TRACEPARENT),))
        await GenerationServiceStub(channel).ListModels(pb.ListModelsRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert [s.name for s in await _spans(runtime, exported, 1)] == [
        "tokenwire.v1.GenerationService/ListModels"]
