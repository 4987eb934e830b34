"""One caller's bad request never takes the gateway out of service, and every failure is
bounded and typed: against the test Ollama, with the breaker and retries on."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama, Fault
from tests.helpers import reason
from tests.reliability._util import generate_all, outcome
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

SERVING = health_pb2.HealthCheckResponse.SERVING


def _posts(fake: FakeOllama, path: str = "/api/generate") -> list[float]:
    return [r.at for r in fake.requests if r.method == "POST" and r.path == path]


async def _health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int((await stub.Check(health_pb2.HealthCheckRequest(service=""))).status)


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- the engine answers and refuses: never an outage ----------------------------------------


@pytest.mark.parametrize(("text", "code", "why"), [
    ("invalid JSON schema in format", grpc.StatusCode.INVALID_ARGUMENT, "known"),
    ("grammar rule 'root' references an undefined symbol", grpc.StatusCode.INTERNAL,
     "unknown words"),
    ("the value of knob 'x' must be positive", grpc.StatusCode.INVALID_ARGUMENT,
     "unknown words that point at the request"),
])
async def test_rejected_requests_never_open_the_circuit(
        make_runtime: MakeRuntime, fake: FakeOllama, text: str, code: grpc.StatusCode,
        why: str) -> None:
    """Two such requests opened the circuit before (threshold 2, 2 retries each); 20 now
    leave it closed, each reaches Ollama once, and other callers are served throughout."""
    runtime = await make_runtime(breaker_threshold=2, upstream_retries=2, retry_backoff=0.01)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        fake.set_fault(Fault(status=500, message=text, times=20))
        for _ in range(20):
            err = await _failure(generate_all(stub))
            assert err.code() == code, (why, err.code(), err.details())
            assert reason(err) in ("UPSTREAM_REJECTED_REQUEST", "UPSTREAM_ERROR")
            assert text in (err.details() or "")  # the engine's words, not a guess
        assert len(_posts(fake)) == 20  # none retried
        assert not runtime.upstream.breaker.is_open
        assert await _health(channel) == SERVING
        assert (await generate_all(stub))[-1].done  # the next caller is served


@pytest.mark.parametrize(("status", "body"), [
    (502, b"<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"),
    (500, b""),
    (503, None),
])
async def test_outage_signals_still_open_the_circuit(
        make_runtime: MakeRuntime, fake: FakeOllama, status: int, body: bytes | None) -> None:
    runtime = await make_runtime(breaker_threshold=2, upstream_retries=1, retry_backoff=0.01)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        fake.set_fault(Fault(status=status, message="server busy", error_body=body))
        err = await _failure(generate_all(stub))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert len(_posts(fake)) == 2  # retried once: an outage
        assert runtime.upstream.breaker.is_open  # two failures in a row
        again = await _failure(generate_all(stub))
        assert reason(again) == "CIRCUIT_OPEN"


# -- bounded --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8 << 10, 20 << 20])
async def test_a_huge_error_page_gives_a_short_status(
        make_runtime: MakeRuntime, fake: FakeOllama, size: int, figures: dict[str, Any]) -> None:
    """An HTML 502 page of 8 KiB or 20 MiB: the status message and details stay small, so the
    client gets UNAVAILABLE and not a metadata-size error, on streams and on unary calls."""
    runtime = await make_runtime(upstream_retries=2, retry_backoff=0.01)
    page = b"<html><body>" + b"bad gateway " * (size // 12) + b"</body></html>"
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        for call in (lambda: generate_all(stub), lambda: stub.ListModels(
                pb.ListModelsRequest(), timeout=10)):
            fake.set_fault(Fault(status=502, error_body=page))
            started = time.monotonic()
            err = await _failure(call())
            took = time.monotonic() - started
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert reason(err) == "UPSTREAM_UNAVAILABLE"
            details = err.details() or ""
            assert "<html><body>bad gateway" in details
            assert len(details.encode()) <= 2048
            if size > 64 << 10:
                assert "[cut:" in details
            assert sum(len(v) for _, v in err.trailing_metadata() or ()) < 8192
            assert took < 5, took
            print(f"\n{size}-byte 502 page: UNAVAILABLE after {took * 1000:.0f} ms (3 attempts "
                  f"on streams), message {len(details.encode())} bytes")
            figures.setdefault("error_page", {})[str(size)] = {
                "ms": round(took * 1000, 1), "message_bytes": len(details.encode())}


async def test_unary_calls_have_a_time_limit_and_free_their_slots(
        make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    """An upstream that takes the connection and never answers: ListModels and Embed end
    DEADLINE_EXCEEDED after --unary-timeout, and the Embeds' admission slots come back, so
    the caller's next Generate is not refused."""
    runtime = await make_runtime(unary_timeout=0.4, max_streams_per_caller=2)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        fake.set_fault(Fault(hang=True, paths=("/api/tags", "/api/embed")))
        started = time.monotonic()
        errors = await asyncio.gather(
            _failure(stub.ListModels(pb.ListModelsRequest())),
            _failure(stub.Embed(pb.EmbedRequest(model="embedder", inputs=["a"]))),
            _failure(stub.Embed(pb.EmbedRequest(model="embedder", inputs=["b"]))))
        took = time.monotonic() - started
        for err in errors:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert reason(err) == "UPSTREAM_TIMEOUT"
            assert "--unary-timeout" in (err.details() or "")
        assert 0.4 <= took < 2.0, took
        assert runtime.admission.in_use == 0
        fake.set_fault(None)
        assert (await generate_all(stub))[-1].done
        # A caller's own shorter deadline wins, and is not held against the upstream.
        fake.set_fault(Fault(hang=True, paths=("/api/tags",)))
        runtime.upstream.unary_timeout = 30.0
        started = time.monotonic()
        err = await _failure(stub.ListModels(pb.ListModelsRequest(), timeout=0.3))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0


# -- typed: impossible values from the upstream ---------------------------------------------


def _lines(*objs: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


_TOKENS = [{"model": "tiny", "response": word, "done": False} for word in ("one", " two")]
_FINAL = {"model": "tiny", "response": " three", "done": True, "done_reason": "stop"}


async def _protocol_error(stub: GenerationServiceStub, fake: FakeOllama,
                          chunks: list[dict[str, Any]], final: dict[str, Any],
                          ) -> tuple[list[pb.Token], grpc.aio.AioRpcError]:
    """Streams an answer made of these lines: what arrived, and the error it ended with
    (which must be UPSTREAM_PROTOCOL_ERROR)."""
    fake.set_fault(Fault(raw_body=_lines(*chunks, final)))
    received: list[pb.Token] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for token in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                                         timeout=10):
            received.append(token)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert reason(info.value) == "UPSTREAM_PROTOCOL_ERROR"
    return received, info.value


@pytest.mark.parametrize(("field", "value"), [
    ("eval_count", -1),
    ("eval_count", 2**32),
    ("prompt_eval_count", "12"),
    ("eval_duration", 2**70),
    ("total_duration", -5),
    ("load_duration", [1]),
    ("done_reason", {"why": "no"}),
    ("model", 42),
])
async def test_impossible_figures_on_the_final_line_are_a_protocol_error(
        stub: GenerationServiceStub, fake: FakeOllama, field: str, value: object) -> None:
    """Every token is delivered, including the text that came on the bad final line; then
    UPSTREAM_PROTOCOL_ERROR naming the field (it was INTERNAL, 'see the server log', and the
    last text was lost)."""
    received, err = await _protocol_error(stub, fake, _TOKENS, {**_FINAL, field: value})
    assert field in (err.details() or "")
    assert "".join(t.text for t in received) == "one two three"
    assert not any(t.done for t in received)


@pytest.mark.parametrize("chunk", [
    {"response": 5, "done": False},
    {"response": ["a"], "done": False},
    {"thinking": {"x": 1}, "response": "", "done": False},
    {"response": "", "tool_calls": "call me", "done": False},
    {"response": "", "tool_calls": [{"function": {"name": "f", "index": -2}}], "done": False},
    {"response": "", "tool_calls": [{"function": {"name": "f", "arguments": 3}}],
     "done": False},
])
async def test_mistyped_chunks_are_a_protocol_error_after_what_came_before(
        stub: GenerationServiceStub, fake: FakeOllama, chunk: dict[str, Any]) -> None:
    received, _ = await _protocol_error(stub, fake, [*_TOKENS, chunk], _FINAL)
    assert "".join(t.text for t in received) == "one two"


async def test_impossible_model_lists_and_vectors_are_a_protocol_error(
        stub: GenerationServiceStub, fake: FakeOllama) -> None:
    for path, body, call in (
        ("/api/tags", {"models": [{"name": "a", "size": -1}]},
         lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5)),
        ("/api/tags", {"models": [{"name": "a", "details": "x"}]},
         lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5)),
        ("/api/embed", {"embeddings": [["0.1", 2]]},
         lambda: stub.Embed(pb.EmbedRequest(model="embedder", inputs=["a"]), timeout=5)),
        ("/api/embed", {"embeddings": [[0.5]], "prompt_eval_count": -3},
         lambda: stub.Embed(pb.EmbedRequest(model="embedder", inputs=["a"]), timeout=5)),
    ):
        fake.set_fault(Fault(status=200, error_body=orjson.dumps(body), paths=(path,)))
        err = await _failure(call())
        assert err.code() == grpc.StatusCode.INTERNAL, (body, err.details())
        assert reason(err) == "UPSTREAM_PROTOCOL_ERROR"


# -- bounded in bytes: big lines for a slow caller ------------------------------------------


async def test_big_lines_for_a_slow_caller_are_bounded_in_bytes_and_split_to_fit(
        make_runtime: MakeRuntime, fake: FakeOllama, figures: dict[str, Any]) -> None:
    """16 lines of 6 MiB wait for a caller who reads nothing for a while: the gateway holds
    a bounded number of bytes (it held all 16 once, and merged them into one 94 MiB
    message that gRPC refused); every message fits --max-message-bytes, and the text
    arrives whole."""
    limit = 8 << 20
    runtime = await make_runtime(max_message_bytes=limit, idle_timeout=30.0)
    big = "x" * (6 << 20)
    lines = [{"model": "tiny", "response": big, "done": False} for _ in range(16)]
    fake.set_fault(Fault(raw_body=_lines(*lines, {**_FINAL, "response": ""})))
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(runtime.target, options=options) as channel:
        call = GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(model="tiny", prompt="p"), timeout=60)
        peak = 0
        for _ in range(40):  # read nothing for 2 s; watch what the gateway holds
            await asyncio.sleep(0.05)
            peak = max([peak, *(r.pending_bytes for r in runtime.servicer._relays)])
        sizes, chars, counted = [], 0, 0
        async for token in call:
            sizes.append(token.ByteSize())
            chars += len(token.text)
            counted += token.chunk_count
    assert chars == 16 * len(big)
    assert counted == 17
    assert max(sizes) <= limit, max(sizes)
    held_bound = min(4 << 20, limit) + (6 << 20) + 200  # the bound plus the line that hit it
    assert 0 < peak <= held_bound, peak
    print(f"\n16 x 6 MiB lines to a slow caller: held at most {peak / 2**20:.1f} MiB; "
          f"{len(sizes)} messages, largest {max(sizes) / 2**20:.1f} MiB (limit 8 MiB)")
    figures["big_lines"] = {"held_mib": round(peak / 2**20, 2), "messages": len(sizes),
                            "largest_mib": round(max(sizes) / 2**20, 2)}


# -- retries with full jitter ---------------------------------------------------------------


async def test_retries_are_jittered_so_gateways_do_not_come_back_in_lockstep(
        make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    """20 calls meet the same outage at once: their retries spread over the backoff window
    (full jitter) instead of all landing `backoff` seconds later together."""
    runtime = await make_runtime(upstream_retries=1, retry_backoff=0.5)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        fake.set_fault(Fault(status=503, message="server busy"))
        codes = await asyncio.gather(*(outcome(generate_all(stub)) for _ in range(20)))
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    times = sorted(_posts(fake))
    assert len(times) == 40  # one retry each
    start = times[0]
    inside = [at - start for at in times if 0.05 < at - start < 0.45]
    # Without jitter every retry lands at 0.5 s and none inside; with it, about 16 do.
    assert len(inside) >= 5, [round(at - start, 3) for at in times]
    assert times[-1] - start <= 0.5 + 0.3
