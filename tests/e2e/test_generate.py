"""Generate and Chat end to end: in-process server, test Ollama on a socket."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.conftest import FAST, runtimes
from tests.fakeollama import FakeOllama
from tests.helpers import joined, last_body, reason
from tests.reliability.pki import make_pki
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

USER = pb.Message(role=pb.ROLE_USER, content="hello")


async def test_generate_streams_every_chunk_then_one_final(
    stub: GenerationServiceStub, fake: FakeOllama
) -> None:
    fake.final_text = " (end)"
    tokens = [t async for t in stub.Generate(pb.GenerateRequest(model="tiny", prompt="sky?"))]
    assert joined(tokens) == "".join(fake.tokens) + " (end)"
    assert [t.done for t in tokens].count(True) == 1 and tokens[-1].done
    final = tokens[-1]
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert final.model == "tiny"
    assert final.usage.completion_tokens == len(fake.tokens)
    assert final.usage.prompt_tokens > 0
    assert final.usage.eval_duration.ToNanoseconds() > 0
    assert final.usage.time_to_first_token.ToNanoseconds() > 0
    assert final.usage.gateway_duration.ToNanoseconds() >= (
        final.usage.time_to_first_token.ToNanoseconds())
    assert final.usage.engine_finish_reason == "stop"
    assert sum(t.chunk_count for t in tokens) == len(fake.tokens) + 1
    assert last_body(fake, "/api/generate")["prompt"] == "sky?"
    assert last_body(fake, "/api/generate")["stream"] is True


async def test_true_streaming_each_chunk_arrives_before_the_next_is_made(
    stub: GenerationServiceStub, fake: FakeOllama
) -> None:
    fake.token_delay = 0.15
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, int]] = []
    async for _ in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p")):
        arrivals.append((loop.time(), fake.streams[-1].chunks_sent))
    # one message per chunk when the caller keeps up (no coalescing, no buffering)
    assert len(arrivals) == len(fake.tokens) + 1
    # when message i arrived, the upstream had sent at most i+1 chunks
    for i, (_, sent) in enumerate(arrivals[:-1]):
        assert sent <= i + 1, f"message {i} arrived only after chunk {sent} was produced"
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert min(gaps[:-1]) > 0.1  # spread out at the model's pace, not in one burst


async def test_slow_caller_gets_coalesced_messages_with_exact_counts(
    stub: GenerationServiceStub, fake: FakeOllama
) -> None:
    fake.tokens = [f"w{i} " for i in range(300)]
    call = stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"))
    first = await call.read()
    await asyncio.sleep(0.3)  # upstream runs ahead while we do not read
    rest = []
    while (token := await call.read()) is not grpc.aio.EOF:
        rest.append(token)
    tokens = [first, *rest]
    assert joined(tokens) == "".join(fake.tokens)
    assert len(tokens) < len(fake.tokens)  # piled-up chunks were packed together
    assert sum(t.chunk_count for t in tokens) == len(fake.tokens) + 1
    assert tokens[-1].done and tokens[-1].usage.completion_tokens == 300


async def test_request_id_returned_and_caller_id_honoured(stub: GenerationServiceStub) -> None:
    call = stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                         metadata=(("x-request-id", "abc-123"),))
    assert ("x-request-id", "abc-123") in tuple(await call.initial_metadata())
    _ = [t async for t in call]
    assert ("x-request-id", "abc-123") in tuple(await call.trailing_metadata())
    call = stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"))
    generated = dict(await call.initial_metadata())["x-request-id"]
    assert len(generated) == 32
    _ = [t async for t in call]
    assert dict(await call.trailing_metadata())["x-request-id"] == generated


async def test_options_reach_ollama(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    request = pb.GenerateRequest(
        model="tiny", prompt="p", system="sys",
        options=pb.Options(temperature=0, max_tokens=3, stop=["."], seed=1),
        format=pb.Format(json=True), keep_alive=Duration(seconds=90),
    )
    tokens = [t async for t in stub.Generate(request)]
    body = last_body(fake, "/api/generate")
    assert body["options"] == {"temperature": 0.0, "num_predict": 3, "stop": ["."], "seed": 1}
    assert (body["system"], body["format"], body["keep_alive"]) == ("sys", "json", 90)
    assert tokens[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert joined(tokens) == "".join(fake.tokens[:3])


@pytest.mark.parametrize(("keep_alive", "reason"), [
    (None, pb.FINISH_REASON_LOAD), (Duration(seconds=0), pb.FINISH_REASON_UNLOAD)])
async def test_empty_prompt_loads_or_unloads(stub: GenerationServiceStub,
                                             keep_alive: Duration | None, reason: int) -> None:
    request = pb.GenerateRequest(model="tiny", keep_alive=keep_alive)
    tokens = [t async for t in stub.Generate(request)]
    assert len(tokens) == 1 and tokens[0].done and tokens[0].finish_reason == reason


async def test_chat_streams_thinking_apart_and_tool_calls(
    stub: GenerationServiceStub, fake: FakeOllama
) -> None:
    fake.thinking = ["Let me", " think."]
    fake.tool_calls = [{"id": "call_1", "function": {"index": 0, "name": "weather",
                                                     "arguments": {"city": "Paris"}}}]
    request = pb.ChatRequest(
        model="think-model", think=pb.THINK_ENABLED,
        messages=[pb.Message(role=pb.ROLE_SYSTEM, content="brief"), USER,
                  pb.Message(role=pb.ROLE_ASSISTANT, content="hi"), USER],
        tools=[pb.Tool(name="weather")],
    )
    tokens = [t async for t in stub.Chat(request)]
    assert "".join(t.thinking for t in tokens) == "Let me think."
    assert joined(tokens) == "".join(fake.tokens)
    calls = [c for t in tokens for c in t.tool_calls]
    assert [(c.id, c.name, dict(c.arguments)) for c in calls] == [
        ("call_1", "weather", {"city": "Paris"})]
    body = last_body(fake, "/api/chat")
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["think"] is True and body["tools"][0]["function"]["name"] == "weather"


async def test_chat_tool_calls_on_final_chunk(stub: GenerationServiceStub,
                                              fake: FakeOllama) -> None:
    fake.tool_calls = [{"function": {"name": "f", "arguments": {}}}]
    fake.tool_calls_on_done = True
    tokens = [t async for t in stub.Chat(pb.ChatRequest(model="tiny", messages=[USER]))]
    assert [c.name for c in tokens[-1].tool_calls] == ["f"] and tokens[-1].done


async def test_complete_returns_the_whole_answer(stub: GenerationServiceStub,
                                                 fake: FakeOllama) -> None:
    fake.final_text = "!"
    response = await stub.Complete(pb.CompleteRequest(
        generate=pb.GenerateRequest(model="tiny", prompt="p")))
    assert response.text == "".join(fake.tokens) + "!"
    assert response.finish_reason == pb.FINISH_REASON_STOP
    assert response.usage.completion_tokens == len(fake.tokens)
    assert response.model == "tiny"
    chat = await stub.Complete(pb.CompleteRequest(chat=pb.ChatRequest(model="tiny",
                                                                      messages=[USER])))
    assert chat.text == "".join(fake.tokens) + "!"


async def test_hundred_concurrent_streams(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.token_delay = 0.01

    async def one(i: int) -> str:
        tokens = [t async for t in stub.Generate(pb.GenerateRequest(model="tiny",
                                                                    prompt=f"p{i}"))]
        assert tokens[-1].done
        return joined(tokens)

    results = await asyncio.gather(*(one(i) for i in range(100)))
    assert results == ["".join(fake.tokens)] * 100
    assert len(fake.streams) == 100 and all(s.completed for s in fake.streams)


async def test_list_models_and_embed(stub: GenerationServiceStub) -> None:
    models = await stub.ListModels(pb.ListModelsRequest())
    assert {m.name for m in models.models} == {"tiny:latest", "think-model:latest",
                                              "embedder:latest"}
    assert all(m.format == "gguf" and m.size_bytes > 0 for m in models.models)
    embedded = await stub.Embed(pb.EmbedRequest(model="embedder", inputs=["a", "b"]))
    assert len(embedded.embeddings) == 2
    assert all(len(e.values) > 0 for e in embedded.embeddings)
    assert embedded.embeddings[0].values != embedded.embeddings[1].values


async def test_an_https_upstream_streams_and_answers(tmp_path: Path) -> None:
    """Ollama behind TLS: streams (the lean transport) and JSON calls (httpx) both verify
    its certificate against --upstream-ca-file; without that CA the call is refused as
    unreachable, naming the certificate problem."""
    pki = make_pki(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.server.cert_path, pki.server.key_path)
    async with FakeOllama(ssl_context=tls) as fake:
        assert fake.url.startswith("https://")
        async with runtimes(replace(FAST, ollama_url=fake.url)) as make:
            trusted = await make(upstream_ca_file=str(pki.ca_path))
            async with grpc.aio.insecure_channel(trusted.target) as channel:
                stub = GenerationServiceStub(channel)
                tokens = [t async for t in stub.Generate(
                    pb.GenerateRequest(model="tiny", prompt="hi"), timeout=10)]
                assert joined(tokens) == "".join(fake.tokens) and tokens[-1].done
                listed = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
                assert [m.name for m in listed.models] == ["tiny:latest"]
            untrusted = await make()
            async with grpc.aio.insecure_channel(untrusted.target) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in GenerationServiceStub(channel).Generate(
                            pb.GenerateRequest(model="tiny", prompt="hi"), timeout=10):
                        pass
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert reason(info.value) == "UPSTREAM_UNREACHABLE"
                assert "CERTIFICATE_VERIFY_FAILED" in (info.value.details() or "")
