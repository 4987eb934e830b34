"""Every error the real Ollama (v0.24.0) gives, as tokenwire reads it: which failed (the
engine, or this one request), the status a caller gets, and that a refused request never
moves the circuit breaker or health.

Two ways in. Requests that tokenwire can make on a caller's behalf go through the gateway
end to end. Requests it never makes (a missing body, a wrong JSON type, a bad Host header:
its validation or its encoder rule them out) are sent to Ollama directly, and the answer
Ollama really gave is fed to the classifier the gateway uses, so the table below is checked
against Ollama's own words on every run, not against notes about them."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import runtimes
from tests.helpers import reason, violations
from tests.real.conftest import MODEL, REAL, MakeRuntime, RealOllama, shower, started_ollama
from tests.real.test_real_ollama import greedy, receive
from tokenwire.service import status_for
from tokenwire.service._status import error_reason_var
from tokenwire.service.backends.ollama._errors import classify_http_error, engine_said
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

pytestmark = pytest.mark.real

LONG = "word " * 100  # about 100 tokens: seconds of prompt evaluation on 2 cores (15-40 per s)


@dataclass(frozen=True)
class Case:
    """One request sent straight to Ollama, and what tokenwire must make of the answer."""

    name: str
    path: str
    body: bytes
    said: str  # a piece of Ollama's own error text
    status: int  # the HTTP status Ollama answers with
    code: str  # the gRPC status tokenwire gives
    reason: str
    field: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    method: str = "POST"


def _json(obj: Any) -> bytes:
    return orjson.dumps(obj)


REJECTED = ("INVALID_ARGUMENT", "UPSTREAM_REJECTED_REQUEST")
CASES = [
    # shared/OLLAMA.md's table, section 3, and scripts/ollama-wire-notes.md's error table.
    Case("missing body", "/api/generate", b"", "missing request body", 400, *REJECTED),
    Case("truncated body", "/api/generate", b'{"model":', "unexpected EOF", 400, *REJECTED),
    Case("mistyped field", "/api/generate", _json({"model": MODEL, "prompt": 5}),
         "cannot unmarshal", 400, *REJECTED),
    Case("generate, no model", "/api/generate", _json({"prompt": "hi"}), "model '' not found",
         404, "NOT_FOUND", "MODEL_NOT_FOUND", "model"),
    Case("chat, no model", "/api/chat", _json({"messages": []}), "model is required", 400,
         *REJECTED, "model"),
    Case("invalid model name", "/api/generate", _json({"model": "a b c", "prompt": "hi"}),
         "invalid model name", 400, *REJECTED, "model"),
    Case("generate, unknown model", "/api/generate", _json({"model": "nope:1b", "prompt": "h"}),
         "model 'nope:1b' not found", 404, "NOT_FOUND", "MODEL_NOT_FOUND", "model"),
    Case("chat, unknown model", "/api/chat",
         _json({"model": "nope:1b", "messages": [{"role": "user", "content": "hi"}]}),
         "model 'nope:1b' not found", 404, "NOT_FOUND", "MODEL_NOT_FOUND", "model"),
    Case("embed, unknown model", "/api/embed", _json({"model": "nope:1b", "input": "hi"}),
         'model "nope:1b" not found, try pulling it first', 404, "NOT_FOUND", "MODEL_NOT_FOUND",
         "model"),
    Case("option of the wrong type (Ollama says 500)", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "options": {"temperature": "hot"}}),
         'option "temperature" must be of type float32', 500, *REJECTED,
         "options.temperature"),
    Case("stop as a string (Ollama says 500)", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "options": {"stop": "x"}}),
         'option "stop" must be of type array', 500, *REJECTED, "options.stop"),
    Case("format neither json nor a schema (Ollama says 500)", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "format": "yaml"}), "invalid format", 500,
         *REJECTED, "format"),
    Case("think on a model that cannot", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "think": True}), "does not support thinking",
         400, *REJECTED, "think"),
    Case("invalid think value", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "think": "x"}), "invalid think value", 400,
         *REJECTED, "think"),
    Case("tools on a model that cannot", "/api/chat",
         _json({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f"}}]}),
         "does not support tools", 400, *REJECTED, "tools"),
    Case("suffix on a model that cannot", "/api/generate",
         _json({"model": MODEL, "prompt": "def f(", "suffix": "return 1"}),
         "does not support insert", 400, *REJECTED, "suffix"),
    Case("raw with a system prompt", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "raw": True, "system": "s"}),
         "raw mode does not support", 400, *REJECTED, "raw"),
    Case("top_logprobs out of range", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "logprobs": True, "top_logprobs": 50}),
         "top_logprobs must be between 0 and 20", 400, *REJECTED),
    Case("keep_alive without a unit", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "keep_alive": "300"}),
         "missing unit in duration", 400, *REJECTED, "keep_alive"),
    Case("prompt over the context, truncate off", "/api/generate",
         _json({"model": MODEL, "prompt": "word " * 300, "truncate": False,
                "options": {"num_ctx": 128}}),
         "the input length exceeds the context length", 400, *REJECTED, "prompt"),
    Case("embed input of the wrong type", "/api/embed", _json({"model": MODEL, "input": 3}),
         "invalid input type", 400, *REJECTED, "inputs"),
    Case("embed input over the context, truncate off", "/api/embed",
         _json({"model": MODEL, "input": "word " * 300, "truncate": False,
                "options": {"num_ctx": 128}}),
         "the input length exceeds the context length", 400, *REJECTED, "inputs"),
    Case(":local and :cloud", "/api/generate",
         _json({"model": MODEL + ":local:cloud", "prompt": "hi"}),
         "use either :local or :cloud, not both", 400, *REJECTED, "model"),
    Case("a cloud model with the cloud disabled", "/api/generate",
         _json({"model": "gpt-oss:20b-cloud", "prompt": "hi"}), "ollama cloud is disabled",
         403, "PERMISSION_DENIED", "UPSTREAM_FORBIDDEN"),
    Case("Host header refused", "/api/generate", _json({"model": MODEL, "prompt": "hi"}), "",
         403, "PERMISSION_DENIED", "UPSTREAM_FORBIDDEN", headers=(("Host", "example.com"),)),
    Case("not Ollama's API (wrong --ollama-url path)", "/v2/generate", b"{}",
         "404 page not found", 404, "INTERNAL", "UPSTREAM_ERROR"),
    Case("GET on a POST endpoint", "/api/generate", b"", "405 method not allowed", 405,
         "INTERNAL", "UPSTREAM_ERROR", method="GET"),
]
#: JSON schemas Ollama v0.24.0 cannot turn into a grammar: 500 "invalid JSON schema in format".
BAD_SCHEMAS = [
    {"type": "nonsense"},
    {"type": "object", "properties": {"a": {"$ref": "#/definitions/nope"}}},
    {"type": ["object", 5]},
    {"type": "string", "pattern": "(("},
    {"type": "object", "properties": 5},
]
CASES += [
    Case(f"invalid JSON schema {i} (Ollama says 500)", "/api/generate",
         _json({"model": MODEL, "prompt": "hi", "format": schema,
                "options": {"num_predict": 1}}),
         "invalid JSON schema in format", 500, *REJECTED, "format")
    for i, schema in enumerate(BAD_SCHEMAS)
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_every_ollama_error_is_read_by_who_failed(
        ollama_http: httpx.AsyncClient, case: Case) -> None:
    answer = await ollama_http.request(case.method, case.path, content=case.body,
                                       headers=dict(case.headers))
    assert answer.status_code == case.status, answer.text
    assert case.said in (engine_said(answer.content) or answer.text)
    exc = classify_http_error(answer.status_code, answer.content, "nope:1b", case.path)
    assert not exc.outage, f"{case.name}: a live Ollama refused one request: {exc!r}"
    status = status_for(exc)
    assert (status.code.name, error_reason_var.get()) == (case.code, case.reason), exc
    assert exc.field == case.field
    if case.said:
        assert case.said in exc.message or case.reason == "MODEL_NOT_FOUND"


def _schema(obj: dict[str, Any]) -> pb.Format:
    schema = struct_pb2.Struct()
    schema.update(obj)
    return pb.Format(json_schema=schema)


async def _health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int((await stub.Check(health_pb2.HealthCheckRequest(service=""))).status)


async def test_fifty_rejected_requests_leave_the_gateway_serving(
        make_real_runtime: MakeRuntime, real_ollama: RealOllama, figures: dict[str, str]) -> None:
    """Two of these opened the circuit before: every caller then got CIRCUIT_OPEN and health
    turned NOT_SERVING, blaming a healthy Ollama. With the production breaker (5 failures)
    and retries (2): 50 rejections in a row, each sent to Ollama once, while another caller
    streams an answer; then health is SERVING and the next caller is served."""
    runtime = await make_real_runtime()  # default breaker_threshold=5, upstream_retries=2
    offset = real_ollama.log_size()
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        other = asyncio.create_task(receive(stub.Generate(pb.GenerateRequest(
            model=MODEL, prompt="Count from one to ten.", options=greedy(24)), timeout=120)))
        for i in range(50):
            call = stub.Generate(pb.GenerateRequest(
                model=MODEL, prompt="hi", format=_schema(BAD_SCHEMAS[i % len(BAD_SCHEMAS)]),
                options=greedy(4)), timeout=60)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await receive(call)
            err = info.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert reason(err) == "UPSTREAM_REJECTED_REQUEST"
            assert "invalid JSON schema in format" in (err.details() or "")
            assert [f for f, _ in violations(err)] == ["format"]
        streamed = await other
        assert streamed.tokens[-1].done and streamed.text
        assert not runtime.upstream.breaker.is_open
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        after = await receive(stub.Generate(pb.GenerateRequest(
            model=MODEL, prompt="hi", options=greedy(4)), timeout=60))
        assert after.tokens[-1].done
    posts = [r for r in real_ollama.requests_since(offset) if r.path == "/api/generate"]
    rejected = [r for r in posts if r.status == 500]
    assert len(rejected) == 50, [r.status for r in posts]  # none retried
    figures["50 rejected schemas"] = (f"{len(rejected)} POSTs, breaker closed, SERVING, "
                                      "a concurrent stream completed")


async def _runner_pids(real_ollama: RealOllama) -> list[int]:
    for _ in range(100):
        if pids := real_ollama.runner_pids():
            return pids
        await asyncio.sleep(0.05)
    raise AssertionError("no ollama runner process")


async def test_a_runner_killed_before_the_first_token_is_retried(
        make_real_runtime: MakeRuntime, real_ollama: RealOllama) -> None:
    """Kill -9 the model runner while it evaluates a long prompt: Ollama answers 500 "model
    runner has unexpectedly stopped" (an outage, not the request's fault), the gateway retries
    before any token was sent, Ollama starts a new runner, and the caller gets its answer."""
    runtime = await make_real_runtime(retry_backoff=0.05)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        warm = await receive(stub.Generate(pb.GenerateRequest(
            model=MODEL, prompt="hi", options=greedy(1)), timeout=60))
        assert warm.tokens[-1].done
        [pid] = await _runner_pids(real_ollama)
        idle = RealOllama.cpu_seconds([pid])
        offset = real_ollama.log_size()
        call = asyncio.create_task(receive(stub.Generate(pb.GenerateRequest(
            model=MODEL, prompt=LONG, options=greedy(4)), timeout=300)))
        # The runner is at work on the prompt (its CPU time grows); the first token comes
        # only once the whole prompt is evaluated.
        while RealOllama.cpu_seconds([pid]) < idle + 0.1:
            assert not call.done()
            await asyncio.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        got = await call
        assert got.tokens[-1].done and got.tokens[-1].usage.completion_tokens >= 1
        statuses = [r.status for r in real_ollama.requests_since(offset)
                    if r.path == "/api/generate"]
        assert statuses == [500, 200], real_ollama.log_since(offset)
        assert pid not in real_ollama.runner_pids()  # a new runner answered
        assert not runtime.upstream.breaker.is_open


async def test_a_runner_killed_mid_stream_ends_unavailable_with_the_tokens_kept(
        make_real_runtime: MakeRuntime, real_ollama: RealOllama) -> None:
    """Mid-stream, Ollama reports the dead runner in a line of the 200 stream ("an error was
    encountered while running the model: unexpected EOF"): UNAVAILABLE, RUNNER_FAILED, every
    token already received kept, nothing retried."""
    runtime = await make_real_runtime()
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        call = stub.Generate(pb.GenerateRequest(
            model=MODEL, prompt="Write a long story about a dragon.", options=greedy(400)),
            timeout=120)
        received: list[pb.Token] = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for token in call:
                received.append(token)
                if len(received) == 5:
                    for pid in real_ollama.runner_pids():
                        os.kill(pid, signal.SIGKILL)
        err = info.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert reason(err) == "UPSTREAM_RUNNER_FAILED"
        assert "running the model" in (err.details() or "")
        assert len(received) >= 5 and "".join(t.text for t in received)
        assert not any(t.done for t in received)


@pytest.fixture(scope="module")
def busy_ollama(request: pytest.FixtureRequest) -> Iterator[RealOllama]:
    """A second real Ollama that queues at most one request (OLLAMA_MAX_QUEUE=1): more at
    once get its own 503 "server busy, please try again.  maximum pending requests
    exceeded"."""
    with started_ollama(shower(request), OLLAMA_MAX_QUEUE="1") as real:
        yield real


async def _unload(stub: GenerationServiceStub) -> None:
    unload = pb.GenerateRequest(model=MODEL, keep_alive=Duration(seconds=0))
    got = await receive(stub.Generate(unload, timeout=60))
    assert got.tokens[-1].finish_reason == pb.FINISH_REASON_UNLOAD


async def test_a_full_queue_is_an_outage_retried_with_jitter(
        busy_ollama: RealOllama, figures: dict[str, str]) -> None:
    """Ollama's own 503: UNAVAILABLE, UPSTREAM_BUSY with its words, RetryInfo; with retries
    the calls it turned away come back (after jittered delays) and are served."""
    request = pb.GenerateRequest(model=MODEL, prompt="Write a story.", options=greedy(20))
    async with runtimes(replace(REAL, ollama_url=busy_ollama.url, breaker_threshold=0)) as make:
        plain = await make(upstream_retries=0)
        async with grpc.aio.insecure_channel(plain.target) as channel:
            stub = GenerationServiceStub(channel)
            await _unload(stub)  # calls queue (and overflow) while a model loads
            offset = busy_ollama.log_size()
            results = await asyncio.gather(
                *(receive(stub.Generate(request, timeout=120)) for _ in range(4)),
                return_exceptions=True)
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert refused, "OLLAMA_MAX_QUEUE=1 turned none of 4 concurrent calls away"
            for err in refused:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert reason(err) == "UPSTREAM_BUSY"
                assert "maximum pending requests exceeded" in (err.details() or "")
            statuses = [r.status for r in busy_ollama.requests_since(offset)
                        if r.path == "/api/generate"]
            assert statuses.count(503) == len(refused), statuses
        patient = await make(upstream_retries=4, retry_backoff=1.0)
        async with grpc.aio.insecure_channel(patient.target) as channel:
            stub = GenerationServiceStub(channel)
            await _unload(stub)
            offset = busy_ollama.log_size()
            served = await asyncio.gather(
                *(receive(stub.Generate(request, timeout=120)) for _ in range(3)))
            assert all(got.tokens[-1].done for got in served)
            statuses = [r.status for r in busy_ollama.requests_since(offset)
                        if r.path == "/api/generate"]
            assert statuses.count(200) == 3 and statuses.count(503) >= 1, statuses
    figures["real 503, queue of 1"] = (f"{len(refused)} of 4 refused UPSTREAM_BUSY without "
                                       f"retries; 3 of 3 served with retries "
                                       f"({statuses.count(503)} 503s retried)")
