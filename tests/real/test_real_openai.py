"""The OpenAI-compatible backend against real OpenAI-compatible servers: Ollama's own ``/v1``
(the pinned Ollama) and llama.cpp's server (llama-cpp-python, ``scripts/llama-dev``), both
serving SmolLM2-135M. The streamed text equals each server's own non-streamed answer at
temperature 0; the usage equals its usage; a cancel closes the stream and the model stops;
errors map per the table."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import httpx
import pytest

from tests.helpers import reason
from tests.real.conftest import MODEL, REAL, RealLlama, RealOllama
from tests.real.test_real_ollama import receive
from tokenwire.service import Runtime, build_server
from tokenwire.service.backends.openai import OpenAIBackend
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

pytestmark = pytest.mark.real

QUESTION = "Name three colours."


@contextlib.asynccontextmanager
async def gateway(base_url: str, flavor: str) -> AsyncIterator[GenerationServiceStub]:
    backend = OpenAIBackend(base_url + "/v1", flavor=flavor, name=f"real-{flavor}")
    runtime: Runtime = await build_server(replace(REAL, ollama_url=base_url),
                                          upstream=backend)
    try:
        async with grpc.aio.insecure_channel(runtime.target) as channel:
            yield GenerationServiceStub(channel)
    finally:
        await runtime.stop(0)


@pytest.fixture(params=["ollama", "llama"])
def engine(request: pytest.FixtureRequest) -> tuple[str, str, Any]:
    """(base URL, flavor, the server) for each real OpenAI-compatible server."""
    if request.param == "ollama":
        real: RealOllama | RealLlama = request.getfixturevalue("real_ollama")
        return real.url, "openai", real
    real = request.getfixturevalue("real_llama")
    return real.url, "llama.cpp", real


async def _direct(base_url: str, max_tokens: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        answer = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0, "seed": 7, "max_tokens": max_tokens, "stream": False})
        answer.raise_for_status()
        return answer.json()  # type: ignore[no-any-return]


async def test_streamed_text_and_usage_equal_the_servers_own_answer(
        engine: tuple[str, str, Any], figures: dict[str, str]) -> None:
    base_url, flavor, _ = engine
    direct = await _direct(base_url, 24)
    async with gateway(base_url, flavor) as stub:
        got = await receive(stub.Chat(pb.ChatRequest(
            model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content=QUESTION)],
            options=pb.Options(temperature=0.0, seed=7, max_tokens=24)), timeout=120))
    final = got.final
    assert got.text == direct["choices"][0]["message"]["content"]
    assert [t.done for t in got.tokens].count(True) == 1
    want = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
    assert final.finish_reason == want[direct["choices"][0]["finish_reason"]]
    usage = direct["usage"]
    assert final.usage.completion_tokens == usage["completion_tokens"]
    if flavor == "openai":  # Ollama streams usage; llama-cpp-python does not (counted)
        assert final.usage.prompt_tokens == usage["prompt_tokens"]
    text_messages = [t for t in got.tokens if t.text]
    assert len(text_messages) >= 2  # streamed, not one lump at the end
    figures[f"openai backend, {flavor}: streamed = direct"] = (
        f"{len(got.text)} chars, {final.usage.completion_tokens} tokens, first text at "
        f"{got.first_text_at * 1000:.0f} ms")


async def _stops_after(pids: list[int], limit: float) -> float:
    """Seconds until the processes' CPU time stays flat for 0.5 s (the model stopped)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    last, quiet = RealOllama.cpu_seconds(pids), 0
    while loop.time() - started < limit:
        await asyncio.sleep(0.1)
        now = RealOllama.cpu_seconds(pids)
        quiet = quiet + 1 if now == last else 0
        last = now
        if quiet >= 5:
            return loop.time() - started - 0.5
    raise AssertionError(f"still generating {limit:g} s after the cancel")


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_cancel_or_deadline_closes_the_stream_and_the_model_stops(
        engine: tuple[str, str, Any], figures: dict[str, str], how: str) -> None:
    """400 tokens would take 5-15 s more; the model must stop long before that (seen: both
    stop within 0.1-0.5 s, now and then after 2-3 s, about as Ollama's native API does)."""
    base_url, flavor, real = engine
    async with gateway(base_url, flavor) as stub:
        call = stub.Generate(pb.GenerateRequest(
            model=MODEL, prompt="Write a very long story about a dragon.",
            options=pb.Options(temperature=0.0, max_tokens=400)),
            timeout=120 if how == "cancel" else 2.0)
        seen = 0
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for token in call:
                seen += bool(token.text)
                if seen >= 3 and how == "cancel":
                    break
        if how == "cancel":
            call.cancel()
        else:
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert seen >= 3  # it streamed until the deadline
        pids = real.runner_pids() if isinstance(real, RealOllama) else [real.pid]
        took = await _stops_after(pids, 6.0)
    figures[f"openai backend, {flavor}: model stopped after a {how}"] = f"{took:.2f} s"


async def test_models_and_embeddings(engine: tuple[str, str, Any]) -> None:
    base_url, flavor, _ = engine
    async with gateway(base_url, flavor) as stub:
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
        assert MODEL in [m.name for m in listed.models]
        embedded = await stub.Embed(pb.EmbedRequest(model=MODEL, inputs=["a", "b"]),
                                    timeout=60)
    assert len(embedded.embeddings) == 2
    assert len(embedded.embeddings[0].values) == 576


async def test_errors_from_the_real_servers(real_ollama: RealOllama,
                                            real_llama: RealLlama) -> None:
    async with gateway(real_ollama.url, "openai") as stub:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await receive(stub.Generate(pb.GenerateRequest(model="nope:1b", prompt="hi"),
                                        timeout=60))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason(info.value) == "MODEL_NOT_FOUND"
    async with gateway(real_llama.url, "llama.cpp") as stub:
        # llama-cpp-python cannot stream an answer to a prompt over its context: a 200 with
        # no event at all, which is a truncated stream, never an empty success.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await receive(stub.Generate(pb.GenerateRequest(
                model=MODEL, prompt="word " * 3000, options=pb.Options(max_tokens=4)),
                timeout=120))
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                     grpc.StatusCode.INTERNAL), info.value.details()
        assert reason(info.value) in ("UPSTREAM_TRUNCATED", "UPSTREAM_REJECTED_REQUEST")
