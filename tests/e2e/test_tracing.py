"""Tracing against a real OpenTelemetry Collector (tests/otelcol.py, built from the Go
module proxy): tokenwire server processes export over OTLP/gRPC, the collector prints
what it received, the tests read it back. The test Ollama records the traceparent it
was sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.fakeollama import FakeOllama, Fault
from tests.helpers import server_process
from tests.otelcol import Collector, Span, collector
from tests.parts import RedisServer, redis_server
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

# The first test may build the collector (scripts/otelcol: minutes, once per machine).
pytestmark = pytest.mark.timeout(900)

PROMPT = "a-prompt-that-must-never-leave-the-gateway"
WORDS = ["answer-word-one ", "answer-word-two ", "answer-word-three"]
#: Spans leave a server 50 ms after they end (the SDK's default is 5 s).
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


def _traceparent(trace: str, span: str) -> tuple[tuple[str, str]]:
    return (("traceparent", f"00-{trace}-{span}-01"),)


def _of(spans: list[Span], trace: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace]


def _named(spans: list[Span], name: str) -> Span:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


@pytest.fixture
async def otelcol(tmp_path: Path) -> AsyncIterator[Collector]:
    async with collector(tmp_path) as running:
        yield running


async def test_spans_reach_the_collector(fake: FakeOllama, otelcol: Collector) -> None:
    fake.tokens = WORDS
    trace, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with server_process(fake.url, "--otlp-endpoint", otelcol.endpoint,
                              **FAST_EXPORT) as server, \
            grpc.aio.insecure_channel(server.target) as channel:
        stub = GenerationServiceStub(channel)
        tokens = [t async for t in stub.Generate(
            pb.GenerateRequest(model="tiny", prompt=PROMPT, options=pb.Options(max_tokens=64)),
            metadata=_traceparent(trace, caller))]
        usage = tokens[-1].usage
        spans = _of(await otelcol.spans(lambda got: len(_of(got, trace)) == 2), trace)
    call = _named(spans, "tokenwire.v1.GenerationService/Generate")
    gen = _named(spans, "text_completion tiny")
    assert (call.kind, call.parent_id, call.status) == ("Server", caller, "Unset")
    assert call.attributes["rpc.system.name"] == "grpc"
    assert call.attributes["rpc.response.status_code"] == "OK"
    assert call.attributes["rpc.grpc.status_code"] == 0
    assert (gen.kind, gen.parent_id) == ("Client", call.span_id)
    assert gen.attributes["gen_ai.operation.name"] == "text_completion"
    assert gen.attributes["gen_ai.provider.name"] == "ollama"
    assert gen.attributes["gen_ai.request.model"] == "tiny"
    assert gen.attributes["gen_ai.request.max_tokens"] == 64
    assert gen.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
    assert gen.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens == 3
    assert gen.attributes["gen_ai.response.finish_reasons"] == '["stop"]'
    assert 0 < float(gen.attributes["gen_ai.response.time_to_first_chunk"]) < 5  # type: ignore[arg-type]
    assert gen.attributes["server.port"] == fake.port
    assert gen.events == ["tokenwire.first_token"]
    assert call.resource["service.name"] == "tokenwire"
    # The engine was sent the GenAI span's context.
    assert fake.requests[-1].headers["traceparent"] == f"00-{trace}-{gen.span_id}-01"
    # No prompt or answer text anywhere the collector saw.
    for text in (PROMPT, *WORDS):
        assert text.strip() not in otelcol.output


async def test_a_failed_call_is_an_error_span(fake: FakeOllama, otelcol: Collector) -> None:
    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    fake.fault = Fault(status=500, message="model runner has unexpectedly stopped")
    async with server_process(fake.url, "--otlp-endpoint", otelcol.endpoint,
                              "--upstream-retries", "0", **FAST_EXPORT) as server, \
            grpc.aio.insecure_channel(server.target) as channel:
        stub = GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(pb.CompleteRequest(chat=pb.ChatRequest(
                model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content=PROMPT)])),
                metadata=_traceparent(trace, "00f067aa0ba902b7"))
        spans = _of(await otelcol.spans(lambda got: len(_of(got, trace)) == 2), trace)
    code = caught.value.code()
    call = _named(spans, "tokenwire.v1.GenerationService/Complete")
    gen = _named(spans, "chat tiny")
    assert call.attributes["rpc.response.status_code"] == code.name
    assert call.attributes["rpc.grpc.status_code"] == code.value[0]
    assert gen.status == "Error"
    assert gen.attributes["error.type"] == "RunnerCrashed"
    assert "gen_ai.usage.output_tokens" not in gen.attributes
    assert PROMPT not in otelcol.output


async def test_tracing_off_exports_nothing(fake: FakeOllama, otelcol: Collector) -> None:
    """A server without --otlp-endpoint sends the collector nothing and the engine no
    traceparent; a traced server's spans, sent after, arrive (so the collector was
    listening all along)."""
    off, on = "6bf92f3577b34da6a3ce929d0e0e4736", "7bf92f3577b34da6a3ce929d0e0e4736"
    async with server_process(fake.url, **FAST_EXPORT) as plain, \
            server_process(fake.url, "--otlp-endpoint", otelcol.endpoint,
                           **FAST_EXPORT) as traced:
        for server, trace in ((plain, off), (traced, on)):
            async with grpc.aio.insecure_channel(server.target) as channel:
                await GenerationServiceStub(channel).Complete(pb.CompleteRequest(
                    generate=pb.GenerateRequest(model="tiny", prompt="p")),
                    metadata=_traceparent(trace, "00f067aa0ba902b7"))
        spans = await otelcol.spans(lambda got: len(_of(got, on)) == 2)
    assert _of(spans, off) == []
    assert "traceparent" not in fake.requests[0].headers
    assert fake.requests[-1].headers["traceparent"].split("-")[1] == on


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server


async def test_a_resume_on_another_replica_joins_the_callers_trace(
        fake: FakeOllama, otelcol: Collector, redis: RedisServer) -> None:
    """Two replicas on one Redis and one collector: Start on one, Resume on the other,
    both with the caller's trace: the trace holds the Start call and the generation
    (replica A) and the Resume call (replica B), each under the caller's spans. A Resume
    in another trace (a new client process) links to the generation."""
    fake.tokens = [f"w{i} " for i in range(20)]
    fake.token_delay = 0.02
    trace = "8bf92f3577b34da6a3ce929d0e0e4736"
    start_span, resume_span = "1111111111111111", "2222222222222222"
    flags = ("--redis-url", redis.url, "--otlp-endpoint", otelcol.endpoint)
    async with server_process(fake.url, *flags, **FAST_EXPORT) as a, \
            server_process(fake.url, *flags, **FAST_EXPORT) as b, \
            grpc.aio.insecure_channel(a.target) as ch_a, \
            grpc.aio.insecure_channel(b.target) as ch_b:
        started = await GenerationServiceStub(ch_a).Start(pb.StartRequest(
            generate=pb.GenerateRequest(model="tiny", prompt=PROMPT)),
            metadata=_traceparent(trace, start_span))
        tokens = [t async for t in GenerationServiceStub(ch_b).Resume(
            pb.ResumeRequest(stream_id=started.stream_id),
            metadata=_traceparent(trace, resume_span))]
        assert "".join(t.text for t in tokens) == "".join(fake.tokens)
        later = "9bf92f3577b34da6a3ce929d0e0e4736"
        [t async for t in GenerationServiceStub(ch_b).Resume(
            pb.ResumeRequest(stream_id=started.stream_id, after=tokens[-1].position),
            metadata=_traceparent(later, "3333333333333333"))]
        got = await otelcol.spans(lambda got: len(_of(got, trace)) == 3 and _of(got, later))
        spans = _of(got, trace)
    start = _named(spans, "tokenwire.v1.GenerationService/Start")
    resume = _named(spans, "tokenwire.v1.GenerationService/Resume")
    gen = _named(spans, "text_completion tiny")
    assert start.parent_id == start_span and resume.parent_id == resume_span
    assert gen.parent_id == start.span_id  # the generation belongs to the Start call
    assert gen.attributes["gen_ai.usage.output_tokens"] == len(fake.tokens)
    assert gen.attributes["tokenwire.resumable"] is True
    # Two replicas: two instances of the service in one trace.
    assert start.resource["service.instance.id"] != resume.resource["service.instance.id"]
    assert gen.resource["service.instance.id"] == start.resource["service.instance.id"]
    assert fake.requests[-1].headers["traceparent"] == f"00-{trace}-{gen.span_id}-01"
    # Both Resumes link to the generation they read, in its trace or not.
    assert resume.links == [(trace, gen.span_id)]
    assert _named(_of(got, later), resume.name).links == [(trace, gen.span_id)]
    assert PROMPT not in otelcol.output
