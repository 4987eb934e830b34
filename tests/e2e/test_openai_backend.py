"""The OpenAI-compatible backend end to end: a tokenwire server in front of
``tests/fakeopenai.py`` (in each of its three observed dialects), with the same gRPC
contract, streaming guarantees and error table as in front of Ollama."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import orjson
import pytest
from google.rpc import error_details_pb2

from tests.conftest import FAST
from tests.fakeopenai import FakeOpenAI, Fault, ToolCall
from tests.helpers import detail, reason, violations
from tokenwire.service import Runtime, build_server
from tokenwire.service.backends.openai import OpenAIBackend
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

DIALECTS = ("openai", "ollama", "llama-cpp-python")
CHAT = ("/v1/chat/completions",)


@contextlib.asynccontextmanager
async def gateway(fake: FakeOpenAI, **overrides: Any) -> AsyncIterator[GenerationServiceStub]:
    flavor = overrides.pop("flavor", "openai")
    settings = replace(FAST, ollama_url=fake.url, **overrides)
    backend = OpenAIBackend(fake.url + "/v1", api_key="sk-test-secret", flavor=flavor,
                            name="fake-openai", connect_timeout=2.0)
    runtime: Runtime = await build_server(settings, upstream=backend)
    try:
        async with grpc.aio.insecure_channel(runtime.target) as channel:
            yield GenerationServiceStub(channel)
    finally:
        await runtime.stop(0)


@pytest.fixture(params=DIALECTS)
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(dialect=request.param, models=("tiny",)) as server:
        yield server


async def _stream(stub: GenerationServiceStub, request: Any) -> list[pb.Token]:
    call = stub.Chat if isinstance(request, pb.ChatRequest) else stub.Generate
    return [t async for t in call(request, timeout=10)]


def _text(tokens: list[pb.Token]) -> str:
    return "".join(t.text for t in tokens)


def _body(fake: FakeOpenAI, path: str) -> dict[str, Any]:
    return [r for r in fake.requests if r.path == path][-1].body  # type: ignore[no-any-return]


USER = [pb.Message(role=pb.ROLE_USER, content="hi")]


async def test_generate_streams_each_chunk_and_ends_with_usage(fake: FakeOpenAI) -> None:
    async with gateway(fake) as stub:
        tokens = await _stream(stub, pb.GenerateRequest(
            model="tiny", prompt="why?", system="be brief",
            options=pb.Options(temperature=0.0, max_tokens=50, seed=3, stop=["\n"])))
    assert _text(tokens) == "".join(fake.tokens)
    final = tokens[-1]
    assert final.done and [t.done for t in tokens].count(True) == 1
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert final.model == "tiny"
    assert final.usage.completion_tokens > 0
    if fake.dialect != "llama-cpp-python":  # it ignores include_usage: the gateway counts
        assert final.usage.prompt_tokens > 0
    body = _body(fake, "/v1/chat/completions")
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "why?"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["max_tokens"], body["seed"], body["stop"]) == (
        0.0, 50, 3, ["\n"])
    auth = [r for r in fake.requests if r.path == "/v1/chat/completions"][-1].headers
    assert auth["authorization"] == "Bearer sk-test-secret"


async def test_chat_reasoning_and_tool_calls(fake: FakeOpenAI) -> None:
    fake.reasoning = ["Let me", " think."]
    fake.tool_calls = [ToolCall("weather", '{"city": "Paris", "unit": "C"}', id="call_1"),
                       ToolCall("time", '{"zone": "CET"}', id="call_2")]
    tool = pb.Tool(name="weather", parameters_text='{"type": "object"}')
    async with gateway(fake) as stub:
        tokens = await _stream(stub, pb.ChatRequest(model="tiny", messages=USER, tools=[tool]))
    assert "".join(t.thinking for t in tokens) == "Let me think."
    calls = [c for t in tokens for c in t.tool_calls]
    assert [(c.id, c.name, c.index) for c in calls] == [("call_1", "weather", 0),
                                                         ("call_2", "time", 1)]
    assert calls[0].arguments_text == '{"city": "Paris", "unit": "C"}'
    assert dict(calls[0].arguments) == {"city": "Paris", "unit": "C"}
    assert tokens[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize("style", ["indexed", "repeated", "whole", "no_index", "index0",
                                   "object_args"])
async def test_tool_call_deltas_however_the_server_cuts_them(style: str) -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.tool_call_style = style  # type: ignore[assignment]
        fake.tool_calls = [ToolCall("a", '{"x": 1, "y": [2, 3]}', id="c1"),
                           ToolCall("b", '{"z": "w"}', id="c2")]
        async with gateway(fake) as stub:
            tokens = await _stream(stub, pb.ChatRequest(model="tiny", messages=USER,
                                                        tools=[pb.Tool(name="a")]))
    calls = [c for t in tokens for c in t.tool_calls]
    assert [c.name for c in calls] == ["a", "b"], style
    assert [orjson.loads(c.arguments_text) for c in calls] == [{"x": 1, "y": [2, 3]},
                                                               {"z": "w"}]


@pytest.mark.parametrize(("forced", "expected"), [
    ("length", pb.FINISH_REASON_LENGTH), ("content_filter", pb.FINISH_REASON_CONTENT_FILTER),
    ("tool_calls", pb.FINISH_REASON_TOOL_CALLS), ("something_new", pb.FINISH_REASON_OTHER)])
async def test_finish_reasons(forced: str, expected: int) -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.finish_reason = forced
        async with gateway(fake) as stub:
            tokens = await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p"))
    assert tokens[-1].finish_reason == expected
    assert tokens[-1].usage.engine_finish_reason == forced


@pytest.mark.parametrize("fault", [
    Fault(split_every=1), Fault(split_every=7), Fault(comment_every=1),
    Fault(newline="\r\n"), Fault(newline="\r"), Fault(multiline_data=True),
    Fault(omit_done=True)],
    ids=["split1", "split7", "comments", "crlf", "cr", "multiline", "no-done-but-finish"])
async def test_sse_framing_never_changes_the_answer(fault: Fault) -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(fault)
        async with gateway(fake) as stub:
            tokens = await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p"))
    assert _text(tokens) == "".join(fake.tokens)
    assert tokens[-1].done


@pytest.mark.parametrize(("fault", "why"), [
    (Fault(truncate_after=3), "no finish reason, no [DONE]"),
    (Fault(truncate_after=3, done_on_truncate=True), "[DONE] without a finish reason"),
])
async def test_a_stream_without_its_end_is_truncated_not_short(fault: Fault, why: str) -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(fault)
        async with gateway(fake) as stub:
            received: list[pb.Token] = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for token in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                                                 timeout=10):
                    received.append(token)
    assert info.value.code() == grpc.StatusCode.INTERNAL, why
    assert reason(info.value) == "UPSTREAM_TRUNCATED"
    assert _text(received) and not any(t.done for t in received)


@pytest.mark.parametrize("style", ["data", "event"])
async def test_an_error_event_after_200_fails_after_the_tokens(style: str) -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault(error_after=3, error_style=style,  # type: ignore[arg-type]
                             message="server overloaded"))
        async with gateway(fake) as stub:
            received: list[pb.Token] = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for token in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                                                 timeout=10):
                    received.append(token)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert reason(info.value) == "UPSTREAM_STREAM_ERROR"
    assert "server overloaded" in (info.value.details() or "")
    assert _text(received)


async def test_rate_limit_with_retry_after_is_resource_exhausted_with_the_wait() -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault.rate_limited(retry_after="30", paths=CHAT))
        async with gateway(fake, upstream_retries=2) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p"))
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(err) == "UPSTREAM_RATE_LIMITED"
    delay = detail(err, error_details_pb2.RetryInfo).retry_delay.ToNanoseconds() / 1e9
    assert delay == pytest.approx(30.0, abs=0.01)
    # The wait (30 s) is longer than the first-token wait allows (10 s): not retried.
    assert len([r for r in fake.requests if r.path == "/v1/chat/completions"]) == 1


async def test_a_short_rate_limit_is_retried_after_its_wait() -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault.rate_limited(retry_after=None, retry_after_ms=150, times=1,
                                          paths=CHAT))
        async with gateway(fake, upstream_retries=2, retry_backoff=0.01) as stub:
            loop = asyncio.get_running_loop()
            started = loop.time()
            tokens = await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p"))
            took = loop.time() - started
    assert tokens[-1].done and took >= 0.15
    assert len([r for r in fake.requests if r.path == "/v1/chat/completions"]) == 2


async def test_an_exhausted_quota_is_not_retried() -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault.quota_exhausted(paths=CHAT))
        async with gateway(fake, upstream_retries=3, retry_backoff=0.01) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(info.value) == "UPSTREAM_QUOTA_EXHAUSTED"
    with pytest.raises(AssertionError):
        detail(info.value, error_details_pb2.RetryInfo)
    assert len([r for r in fake.requests if r.path == "/v1/chat/completions"]) == 1


async def test_loading_503_is_an_outage_retried() -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault.loading(times=1, paths=CHAT))
        async with gateway(fake, upstream_retries=2, retry_backoff=0.01) as stub:
            tokens = await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p"))
    assert tokens[-1].done
    assert len([r for r in fake.requests if r.path == "/v1/chat/completions"]) == 2


@pytest.mark.parametrize("shape", ["openai", "flat", "vllm"])
async def test_both_error_shapes_are_read(shape: str) -> None:
    async with FakeOpenAI(dialect="openai") as fake:
        fake.set_fault(Fault(status=400, message="max_tokens must be positive",
                             error_param="max_tokens", error_shape=shape,  # type: ignore[arg-type]
                             paths=CHAT))
        async with gateway(fake) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(info.value) == "UPSTREAM_REJECTED_REQUEST"
    assert "max_tokens must be positive" in (info.value.details() or "")
    if shape != "flat":
        assert violations(info.value)[0][0] == "options.max_tokens"


async def test_unknown_model_is_not_found() -> None:
    async with FakeOpenAI(dialect="ollama") as fake, gateway(fake) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _stream(stub, pb.GenerateRequest(model="nope", prompt="p"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(info.value) == "MODEL_NOT_FOUND"


async def test_options_the_api_cannot_take_are_refused_naming_field_and_backend() -> None:
    async with FakeOpenAI(dialect="openai") as fake, gateway(fake) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _stream(stub, pb.GenerateRequest(
                model="tiny", prompt="p", options=pb.Options(top_k=5, num_ctx=64),
                think=pb.THINK_ENABLED))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = [f for f, _ in violations(info.value)]
        assert fields == ["options.top_k", "options.num_ctx", "think"]
        assert all("fake-openai" in d for _, d in violations(info.value))
        assert not [r for r in fake.requests if r.path == "/v1/chat/completions"]
        # A flavour that takes top_k sends it.
    async with FakeOpenAI(dialect="llama-cpp-python") as fake, \
            gateway(fake, flavor="llama.cpp") as stub:
        tokens = await _stream(stub, pb.GenerateRequest(
            model="tiny", prompt="p", options=pb.Options(top_k=5, min_p=0.1)))
        assert tokens[-1].done
        body = _body(fake, "/v1/chat/completions")
        assert (body["top_k"], body["min_p"]) == (5, pytest.approx(0.1))


async def test_raw_and_suffix_prompts_use_text_completions(fake: FakeOpenAI) -> None:
    async with gateway(fake) as stub:
        tokens = await _stream(stub, pb.GenerateRequest(model="tiny", prompt="def f(",
                                                        raw=True))
    assert _text(tokens) == "".join(fake.tokens) and tokens[-1].done
    assert _body(fake, "/v1/completions")["prompt"] == "def f("


async def test_json_schema_text_is_sent_as_response_format() -> None:
    schema = '{"type": "object", "properties": {"b": {"type": "string"}, "a": {}}}'
    async with FakeOpenAI(dialect="openai") as fake, gateway(fake) as stub:
        await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p",
                                               format=pb.Format(json_schema_text=schema)))
        raw = [r for r in fake.requests if r.path == "/v1/chat/completions"][-1].raw
    assert b'"json_schema":{"name":"answer","schema":' + schema.encode() in raw


async def test_cancel_closes_the_engine_connection(fake: FakeOpenAI) -> None:
    fake.token_delay = 0.2
    async with gateway(fake) as stub:
        call = stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"), timeout=10)
        async for _ in call:
            break
        call.cancel()
        await asyncio.wait_for(fake.wait_for_disconnect(), 2)


async def test_models_and_embeddings(fake: FakeOpenAI) -> None:
    async with gateway(fake) as stub:
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert [m.name for m in listed.models] == ["tiny"]
        embedded = await stub.Embed(pb.EmbedRequest(model="tiny", inputs=["a", "b"]),
                                    timeout=5)
    assert len(embedded.embeddings) == 2
    assert len(embedded.embeddings[0].values) == fake.embed_dims
