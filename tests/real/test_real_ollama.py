"""tokenwire against a real Ollama with a real model: every RPC, cancellation, queueing and a
cold model load. Generations are kept short (max_tokens) so the tier runs in about a minute on
2 cores; tests compare against what Ollama itself says rather than fixed timings wherever the
machine's speed matters."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.helpers import reason, samples, scrape, value, violations
from tests.real.conftest import MODEL, GinLine, MakeRuntime, RealOllama
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

pytestmark = pytest.mark.real

PROMPT = "Why is the sky blue?"
STORY = "Write a very long story about a dragon and a knight, with many chapters."


def greedy(max_tokens: int, seed: int = 7) -> pb.Options:
    """Deterministic sampling: temperature 0 and a fixed seed."""
    return pb.Options(temperature=0.0, seed=seed, max_tokens=max_tokens)


def secs(d: Duration) -> float:
    return d.ToNanoseconds() / 1e9


@dataclass
class Received:
    """A stream as the caller saw it: messages with their arrival times (from the call)."""

    tokens: list[pb.Token] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    started: float = 0.0

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def final(self) -> pb.Token:
        assert self.tokens and self.tokens[-1].done, "the stream has no final (done) message"
        return self.tokens[-1]

    @property
    def first_text_at(self) -> float:
        return next(t for tok, t in zip(self.tokens, self.times, strict=True) if tok.text)


async def receive(call: Any) -> Received:
    loop = asyncio.get_running_loop()
    got = Received(started=loop.time())
    async for token in call:
        got.tokens.append(token)
        got.times.append(loop.time() - got.started)
    return got


def check_final(got: Received, finish: tuple[int, ...] = (pb.FINISH_REASON_LENGTH,)) -> pb.Usage:
    """Exactly one done message, last; real figures on it."""
    assert [t.done for t in got.tokens].count(True) == 1
    final = got.final
    assert final.finish_reason in finish, pb.FinishReason.Name(final.finish_reason)
    assert final.model == MODEL
    usage = final.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert secs(usage.total_duration) >= secs(usage.load_duration) > 0
    assert secs(usage.prompt_eval_duration) > 0
    assert 0 < secs(usage.time_to_first_token) <= secs(usage.gateway_duration)
    assert usage.engine_finish_reason in ("length", "stop")
    return usage


# -- streaming, unary, models, embed ----------------------------------------------------------


async def test_generate_streams_real_tokens_and_final_stats(
    real_stub: GenerationServiceStub, figures: dict[str, str]
) -> None:
    got = await receive(real_stub.Generate(
        pb.GenerateRequest(model=MODEL, prompt=PROMPT, options=greedy(24))))
    usage = check_final(got)
    assert usage.engine_finish_reason == "length" and usage.completion_tokens == 24
    texts = [t for t in got.tokens if t.text]
    assert len(texts) >= 2 and got.text.strip()
    assert all(t.chunk_count >= 1 for t in got.tokens)
    # Really streamed: the text arrived spread over the generation, not in one piece at the end.
    text_times = [t for tok, t in zip(got.tokens, got.times, strict=True) if tok.text]
    assert text_times[-1] - text_times[0] >= 0.5 * secs(usage.eval_duration) > 0
    assert usage.eval_tokens_per_second > 0 and usage.tokens_per_second > 0
    figures["Generate 24 tokens: tokens/s (gateway / Ollama eval)"] = (
        f"{usage.tokens_per_second:.1f} / {usage.eval_tokens_per_second:.1f}")


async def test_metrics_show_ollamas_counts_and_the_real_first_token_time(
        make_real_runtime: MakeRuntime) -> None:
    runtime = await make_real_runtime(metrics_listen="127.0.0.1:0")
    assert runtime.metrics_port is not None
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        got = await receive(GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(model=MODEL, prompt=PROMPT, options=greedy(8))))
    usage = check_final(got)
    found = samples((await scrape(runtime.metrics_port)).text)
    assert value(found, "tokenwire_rpcs_total", method="Generate", code="OK") == 1
    assert value(found, "tokenwire_tokens_total", kind="completion") == usage.completion_tokens
    assert value(found, "tokenwire_tokens_total", kind="prompt") == usage.prompt_tokens
    assert value(found, "tokenwire_time_to_first_token_seconds_sum", method="Generate") \
        == pytest.approx(secs(usage.time_to_first_token))
    assert value(found, "tokenwire_upstream_up", upstream="ollama") == 1


async def test_chat_multi_turn_with_system_message(real_stub: GenerationServiceStub) -> None:
    history = [
        pb.Message(role=pb.ROLE_SYSTEM, content="You are a geography teacher. Answer briefly."),
        pb.Message(role=pb.ROLE_USER, content="What is the capital of France?"),
        pb.Message(role=pb.ROLE_ASSISTANT, content="Paris."),
        pb.Message(role=pb.ROLE_USER, content="And the capital of Italy?"),
    ]
    got = await receive(real_stub.Chat(
        pb.ChatRequest(model=MODEL, messages=history, options=greedy(16))))
    usage = check_final(got, (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH))
    assert got.text.strip()
    # The whole conversation reached the model: it is longer than its last turn alone.
    alone = await receive(real_stub.Chat(
        pb.ChatRequest(model=MODEL, messages=history[-1:], options=greedy(1))))
    assert usage.prompt_tokens > check_final(alone).prompt_tokens + 20


async def test_unary_complete_matches_the_stream(real_stub: GenerationServiceStub) -> None:
    request = pb.GenerateRequest(model=MODEL, prompt=PROMPT, options=greedy(12))
    streamed = await receive(real_stub.Generate(request))
    response = await real_stub.Complete(pb.CompleteRequest(generate=request))
    assert response.text == streamed.text and response.text.strip()
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert response.usage.completion_tokens == 12 and response.model == MODEL
    chat = await real_stub.Complete(pb.CompleteRequest(chat=pb.ChatRequest(
        model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="Say hello.")],
        options=greedy(8))))
    assert chat.text.strip() and chat.usage.completion_tokens >= 1
    assert chat.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


async def test_list_models_shows_the_model(real_stub: GenerationServiceStub) -> None:
    models = {m.name: m for m in (await real_stub.ListModels(pb.ListModelsRequest())).models}
    model = models[MODEL]
    assert (model.format, model.family, model.parameter_size, model.quantization_level) == (
        "gguf", "llama", "134.52M", "Q4_1")
    assert model.size_bytes > 90_000_000 and len(model.digest) == 64
    assert model.modified_at.seconds > 1_600_000_000


async def test_embed_returns_unit_vectors_equal_to_ollamas(
    real_stub: GenerationServiceStub, ollama_http: httpx.AsyncClient
) -> None:
    """The model lists only the "completion" capability, yet Ollama embeds with it (576 dims,
    normalized): Embed returns those vectors, unchanged."""
    inputs = ["hello world", "The sky is blue because air scatters blue light."]
    response = await real_stub.Embed(pb.EmbedRequest(model=MODEL, inputs=inputs))
    vectors = [list(e.values) for e in response.embeddings]
    assert [len(v) for v in vectors] == [576, 576]
    for v in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4)
    assert vectors[0] != vectors[1]
    assert response.model == MODEL and response.prompt_tokens > 0
    direct = (await ollama_http.post("/api/embed", json={"model": MODEL, "input": inputs})).json()
    for mine, theirs in zip(vectors, direct["embeddings"], strict=True):
        assert mine == pytest.approx(theirs, rel=1e-6)  # float32 on both sides
    short = await real_stub.Embed(pb.EmbedRequest(model=MODEL, inputs=["hi"], dimensions=64))
    assert len(short.embeddings[0].values) == 64


# -- errors from the real Ollama -------------------------------------------------------------


async def test_unknown_model_is_not_found_on_every_rpc(real_stub: GenerationServiceStub) -> None:
    name = "nope:1b"
    user = [pb.Message(role=pb.ROLE_USER, content="hi")]
    calls = [
        lambda: receive(real_stub.Generate(pb.GenerateRequest(model=name, prompt="hi"))),
        lambda: receive(real_stub.Chat(pb.ChatRequest(model=name, messages=user))),
        lambda: real_stub.Complete(pb.CompleteRequest(
            generate=pb.GenerateRequest(model=name, prompt="hi"))),
        lambda: real_stub.Embed(pb.EmbedRequest(model=name, inputs=["hi"])),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason(info.value) == "MODEL_NOT_FOUND"
        assert f"ollama pull {name}" in (info.value.details() or "")


async def test_capabilities_the_model_lacks_are_invalid_argument(
    real_stub: GenerationServiceStub,
) -> None:
    """smollm2:135m cannot think, call tools or fill in the middle: Ollama answers 400 (e.g.
    '"smollm2:135m" does not support thinking') and the caller gets INVALID_ARGUMENT naming the
    field."""
    user = [pb.Message(role=pb.ROLE_USER, content="hi")]
    cases = [
        (real_stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hi",
                                               think=pb.THINK_ENABLED)), "think", "thinking"),
        (real_stub.Chat(pb.ChatRequest(model=MODEL, messages=user, think=pb.THINK_HIGH)),
         "think", "thinking"),
        (real_stub.Chat(pb.ChatRequest(model=MODEL, messages=user,
                                       tools=[pb.Tool(name="weather")])), "tools", "tools"),
        (real_stub.Generate(pb.GenerateRequest(model=MODEL, prompt="def f(", suffix="return 1")),
         "suffix", "insert"),
    ]
    for call, field_name, what in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await receive(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(info.value) == "UPSTREAM_REJECTED_REQUEST"
        [(field_, description)] = violations(info.value)
        assert field_ == field_name and f"does not support {what}" in description


# -- cancellation, queueing, cold load --------------------------------------------------------


async def _generate_requests_logged(
    real_ollama: RealOllama, offset: int, count: int
) -> list[GinLine]:
    """Waits until Ollama has logged ``count`` /api/generate requests after ``offset``."""
    for _ in range(100):
        requests = [r for r in real_ollama.requests_since(offset) if r.path == "/api/generate"]
        if len(requests) >= count:
            assert len(requests) == count, real_ollama.log_since(offset)
            return requests
        await asyncio.sleep(0.1)
    raise AssertionError(f"Ollama logged no {count} requests:\n{real_ollama.log_since(offset)}")


async def test_cancel_really_stops_the_model(
    real_stub: GenerationServiceStub, real_ollama: RealOllama, figures: dict[str, str]
) -> None:
    """With one slot (OLLAMA_NUM_PARALLEL=1) a generation that kept running would hold it for
    hundreds of tokens. After a cancel: Ollama's handler ends with the cancel (its log), the
    next request gets its first token at once, and the runner is idle afterwards."""
    warm_from = real_ollama.log_size()
    await receive(real_stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hi",
                                                        options=greedy(1))))  # warm
    await _generate_requests_logged(real_ollama, warm_from, 1)
    offset = real_ollama.log_size()
    loop = asyncio.get_running_loop()
    call = real_stub.Generate(pb.GenerateRequest(model=MODEL, prompt=STORY, options=greedy(400)))
    started = loop.time()
    arrivals = []
    while len(arrivals) < 3:
        token = await call.read()
        assert token is not grpc.aio.EOF and not token.done
        if token.text:
            arrivals.append(loop.time())
    per_token = (arrivals[2] - arrivals[0]) / 2
    call.cancel()
    cancelled_at = loop.time()

    second = await receive(real_stub.Generate(
        pb.GenerateRequest(model=MODEL, prompt=PROMPT, options=greedy(4))))
    check_final(second)
    ttft = second.first_text_at
    # What a running first generation would have cost the second one: the rest of its 400
    # tokens (the story prompt runs to the limit at temperature 0).
    would_wait = 397 * per_token
    assert ttft < max(3.0, would_wait / 4), (ttft, would_wait)

    # Ollama's own account: the first request's handler returned when the caller cancelled.
    requests = await _generate_requests_logged(real_ollama, offset, 2)
    first_handler = requests[0].seconds
    assert first_handler < (cancelled_at - started) + 1.0, (first_handler, cancelled_at - started)

    # Nothing is still generating: the runner uses (almost) no CPU now.
    runners = real_ollama.runner_pids()
    assert runners, "no ollama runner process found"
    before = real_ollama.cpu_seconds(runners)
    await asyncio.sleep(1.0)
    idle_cpu = real_ollama.cpu_seconds(runners) - before
    assert idle_cpu < 0.25, f"runner used {idle_cpu:.2f} CPU-s in 1 s after the streams ended"

    figures["cancel: first request's Ollama handler ran / cancel came after"] = (
        f"{first_handler:.2f} s / {cancelled_at - started:.2f} s")
    figures["cancel: next request's TTFT / rest of cancelled generation"] = (
        f"{ttft:.2f} s / ~{would_wait:.1f} s (397 tokens at {per_token * 1000:.0f} ms)")
    figures["cancel: runner CPU in the 1 s after"] = f"{idle_cpu:.2f} CPU-s"


async def test_concurrent_streams_queue_and_all_complete(
    real_stub: GenerationServiceStub, figures: dict[str, str]
) -> None:
    """Four streams at once on one slot: Ollama runs them one after another (no headers until a
    stream's first token); the gateway's first-token wait covers the queueing and all finish."""
    prompts = ["Name a colour.", "Name a fruit.", "Name an animal.", "Name a city."]
    results = await asyncio.gather(*(
        receive(real_stub.Generate(pb.GenerateRequest(model=MODEL, prompt=p, options=greedy(6))))
        for p in prompts))
    spans = []
    for got in results:
        check_final(got, (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH))
        assert got.text.strip()
        spans.append((got.first_text_at, got.times[-1]))
    spans.sort()
    # They queued: each stream's first token came after the previous one had finished.
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 0.05, spans
    figures["4 concurrent streams (6 tokens each): first tokens at"] = ", ".join(
        f"{start:.2f}" for start, _ in spans) + " s"


async def _unload(ollama_http: httpx.AsyncClient, stub: GenerationServiceStub | None) -> None:
    """Unloads the model (through tokenwire when given a stub), then waits until Ollama lists
    it no more (its answer comes before the runner has gone)."""
    if stub is None:
        body = (await ollama_http.post("/api/generate", json={"model": MODEL, "keep_alive": 0}))
        assert body.json()["done_reason"] == "unload"
    else:
        got = await receive(stub.Generate(pb.GenerateRequest(
            model=MODEL, prompt="", keep_alive=Duration(seconds=0))))
        assert len(got.tokens) == 1 and got.final.finish_reason == pb.FINISH_REASON_UNLOAD
        assert got.final.usage.completion_tokens == 0
    for _ in range(200):
        if not (await ollama_http.get("/api/ps")).json()["models"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the model is still loaded 10 s after unloading it")


async def test_cold_load_is_covered_by_the_first_token_wait(
    make_real_runtime: MakeRuntime, ollama_http: httpx.AsyncClient, figures: dict[str, str]
) -> None:
    """The model loads before its first token. The idle limit (here 0.2 s, less than the load
    and prompt evaluation) must not apply to that wait; only the first-token limit does."""
    idle = 0.2
    runtime = await make_real_runtime(idle_timeout=idle)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        await _unload(ollama_http, stub)
        request = pb.GenerateRequest(model=MODEL, prompt=PROMPT, options=greedy(1))
        cold = await receive(stub.Generate(request))
        usage = check_final(cold)
        assert secs(usage.time_to_first_token) > idle  # the wait that did not trip the limit
        warm = check_final(await receive(stub.Generate(request)))
        # It was a cold load: starting the runner alone takes ~0.3 s; a warm one is ready.
        assert secs(usage.load_duration) > max(0.1, secs(warm.load_duration))

    # The other side of it: a first-token limit shorter than the load does fire.
    runtime = await make_real_runtime(first_token_timeout=0.1)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        await _unload(ollama_http, None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await receive(stub.Generate(request))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert reason(info.value) == "FIRST_TOKEN_TIMEOUT"
    figures["load_duration cold / warm"] = (
        f"{secs(usage.load_duration) * 1000:.0f} ms / {secs(warm.load_duration) * 1000:.0f} ms")
    figures["TTFT through the gateway, cold / warm"] = (
        f"{secs(usage.time_to_first_token) * 1000:.0f} ms / "
        f"{secs(warm.time_to_first_token) * 1000:.0f} ms")


# -- nothing lost: the gateway's text is Ollama's text ------------------------------------------


async def _direct_stream(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> tuple[str, int, float]:
    """Streams from Ollama itself: the text, the number of chunks, the time to the first text."""
    started = time.perf_counter()
    first: float | None = None
    parts = []
    async with client.stream("POST", "/api/generate", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line:
                piece = orjson.loads(line).get("response", "")
                if piece and first is None:
                    first = time.perf_counter() - started
                parts.append(piece)
    assert first is not None
    return "".join(parts), len(parts), first


async def test_streamed_text_equals_ollamas_own_answer(
    real_stub: GenerationServiceStub, ollama_http: httpx.AsyncClient, figures: dict[str, str]
) -> None:
    """Same prompt, seed, temperature 0 and length: Ollama's whole answer (stream:false) and the
    text tokenwire streamed are identical, so nothing was lost, duplicated or reordered."""
    n = 32
    options = {"num_predict": n, "temperature": 0, "seed": 11}
    body = {"model": MODEL, "prompt": PROMPT, "options": options}
    reference = (await ollama_http.post("/api/generate", json=body | {"stream": False})).json()
    streamed, chunks, _ = await _direct_stream(ollama_http, body)
    got = await receive(real_stub.Generate(
        pb.GenerateRequest(model=MODEL, prompt=PROMPT, options=greedy(n, seed=11))))
    usage = check_final(got)
    assert got.text == reference["response"] == streamed
    assert usage.completion_tokens == reference["eval_count"] == n
    # Every chunk Ollama streams (tokens and the final one) is accounted for by chunk_count.
    assert sum(t.chunk_count for t in got.tokens) == chunks

    # Time to first token, direct and through the gateway, warm, alternating. The machine may
    # be busy: compare the best of five (the least disturbed), report medians too.
    short = body | {"options": options | {"num_predict": 2}}
    direct, gateway = [], []
    for _ in range(5):
        direct.append((await _direct_stream(ollama_http, short))[2])
        via = await receive(real_stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt=PROMPT, options=greedy(2, seed=11))))
        gateway.append(via.first_text_at)
    assert min(gateway) < min(direct) + 0.25, (direct, gateway)
    figures["warm TTFT, direct Ollama / through tokenwire (best of 5; median)"] = (
        f"{min(direct) * 1000:.0f} / {min(gateway) * 1000:.0f} ms; "
        f"{statistics.median(direct) * 1000:.0f} / {statistics.median(gateway) * 1000:.0f} ms")


async def test_repeated_mid_stream_cancels_do_not_starve_the_slot(
    real_stub: GenerationServiceStub, figures: dict[str, str]
) -> None:
    """Ollama's open defect #17131: a stream whose client leaves mid-generation can keep the
    model's parallel slot forever. With OLLAMA_NUM_PARALLEL=1 one such leak would make every
    later request wait without end. Through tokenwire, 20 streams cancelled after 1-5 tokens
    (at varied points) must leave the slot free: the next request answers promptly."""
    loop = asyncio.get_running_loop()
    for i in range(20):
        call = real_stub.Generate(pb.GenerateRequest(model=MODEL, prompt=f"{STORY} ({i})",
                                                     options=greedy(200, seed=i)))
        received = 0
        while received < 1 + i % 5:
            token = await call.read()
            assert token is not grpc.aio.EOF and not token.done
            received += bool(token.text)
        call.cancel()
    started = loop.time()
    after = await receive(real_stub.Generate(
        pb.GenerateRequest(model=MODEL, prompt=PROMPT, options=greedy(4)), timeout=60))
    check_final(after)
    ttft = after.first_text_at
    assert ttft < 5.0, f"first token after 20 cancels took {ttft:.2f} s: a slot is stuck"
    figures["#17131: 20 mid-stream cancels, then first token after"] = (
        f"{ttft:.2f} s ({loop.time() - started:.2f} s for the 4-token answer)")
