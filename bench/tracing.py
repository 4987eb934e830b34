"""Micro-benchmark: the CPU tracing adds to one model call, on and off.

One process holds an in-process tokenwire server, its client and a minimal Ollama-like
upstream (one token, then the final line). Sequential Generate calls, in alternating
rounds on fresh servers: tracing off; on with spans made and dropped (the SDK's cost: two
spans, their attributes, the traceparent, the batch processor); and, with
``--otlp-endpoint``, on exporting over OTLP/gRPC to a collector there (scripts/otelcol
builds one; the exporter's thread and the encoding are counted too, being in this
process). The figure is process CPU (all threads) per call, the median of the rounds;
the difference from "off" is what tracing costs. "off" itself differs from a server
without the tracing code by the few checks measured apart (``--checks``).

Run: ``.venv/bin/python bench/tracing.py [--calls N] [--rounds R] [--otlp-endpoint URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import statistics
import time
import timeit
from collections.abc import Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tokenwire.service import Settings, build_server
from tokenwire.service.tracing import _otel
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

_ANSWER = (b'{"model":"m","created_at":"2026-01-01T00:00:00Z","response":"hi","done":false}\n'
           b'{"model":"m","created_at":"2026-01-01T00:00:00Z","response":"","done":true,'
           b'"done_reason":"stop","prompt_eval_count":3,"eval_count":1}\n')
_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: "
             + str(len(_ANSWER)).encode() + b"\r\n\r\n" + _ANSWER)
_TAGS = b'{"models":[{"name":"m:latest","model":"m:latest"}]}'
_TAGS_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(_TAGS)).encode() + b"\r\n\r\n" + _TAGS)


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection: the tags for GETs, the NDJSON otherwise."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await reader.readexactly(length)
        writer.write(_TAGS_RESPONSE if head.startswith((b"GET", b"HEAD")) else _RESPONSE)
    writer.close()


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def _round(base: Settings, endpoint: str, calls: int) -> float:
    runtime = await build_server(replace(base, otlp_endpoint=endpoint))
    try:
        async with grpc.aio.insecure_channel(runtime.target) as channel:
            stub = GenerationServiceStub(channel)
            request = pb.GenerateRequest(model="m", prompt="p")
            metadata = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)
            for _ in range(50):  # warm up
                [t async for t in stub.Generate(request, metadata=metadata)]
            start = time.process_time()
            for _ in range(calls):
                [t async for t in stub.Generate(request, metadata=metadata)]
            if runtime.tracing is not None:  # what the calls queued is exported too
                await asyncio.to_thread(runtime.tracing.provider.force_flush)
            return (time.process_time() - start) / calls * 1e6
    finally:
        await runtime.stop(0)


def _spans(calls: int, exporter: SpanExporter | None, endpoint: str,
           sampler: str = "parentbased_always_on") -> float:
    """Microseconds of process CPU per call for the tracing work alone: the call's span
    (with the caller's traceparent), the GenAI span, the upstream headers, both ends with
    every attribute, and the batch processor's thread handing them to ``exporter``.
    ``sampler``: OTEL_TRACES_SAMPLER (``always_off``: the cost of a call not sampled)."""
    from tokenwire.service.backends._base import Final

    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", str(4 * calls))  # keep every span
    os.environ["OTEL_TRACES_SAMPLER"] = sampler
    tracing = _otel.Tracing(endpoint, exporter=exporter)
    del os.environ["OTEL_TRACES_SAMPLER"]
    request = pb.ChatRequest(model="m", options=pb.Options(max_tokens=64, temperature=0.5))
    relay = SimpleNamespace(attempts=1, count=1, first_perf=time.perf_counter(),
                            final=Final(1, pb.Usage(prompt_tokens=12, completion_tokens=64),
                                        "m"))
    metadata = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)

    def one() -> None:
        call = tracing.server("/tokenwire.v1.GenerationService/Chat", metadata, "rid")
        call.caller("peer:127.0.0.1")
        gen = tracing.generation("chat", request, call)
        gen.upstream("ollama", "127.0.0.1", 11434, "default")
        gen.end(relay)  # type: ignore[arg-type]
        call.end("OK", None)

    for _ in range(200):
        one()
    tracing.provider.force_flush()
    start = time.process_time()
    for _ in range(calls):
        one()
    tracing.provider.force_flush()
    took = (time.process_time() - start) / calls * 1e6
    tracing.shutdown()
    return took


def _checks() -> float:
    """Nanoseconds of what a call runs with tracing off: the guard's, the servicer's and
    the backend's ``is None`` checks and the one context-variable read."""
    var: contextvars.ContextVar[Any] = contextvars.ContextVar("v", default=None)

    class Guard:
        _tracing = None

    guard = Guard()
    code = ("t = guard._tracing\nif t is not None: pass\n"
            "if guard._tracing is not None: pass\n"
            "g = var.get()\nif g is None: pass\n"
            "if None is not None: pass\nif None is not None: pass\n")
    n = 1_000_000
    return timeit.timeit(code, globals={"guard": guard, "var": var}, number=n) / n * 1e9


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--otlp-endpoint", default="")
    args = parser.parse_args()
    server = await asyncio.start_server(_upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    base = Settings(listen="127.0.0.1:0", ollama_url=f"http://127.0.0.1:{port}",
                    health_interval=60.0)
    real = _otel.OTLPSpanExporter
    cases: dict[str, list[float]] = {"off": [], "on, spans dropped": []}
    if args.otlp_endpoint:
        cases["on, OTLP to the collector"] = []
    for _ in range(args.rounds):
        for case, figures in cases.items():
            _otel.OTLPSpanExporter = (  # type: ignore[misc]
                real if "OTLP" in case else (lambda endpoint: _Drop()))
            endpoint = "" if case == "off" else (args.otlp_endpoint or "http://127.0.0.1:9")
            figures.append(await _round(base, endpoint, args.calls))
    server.close()
    off = statistics.median(cases["off"])
    print(f"{args.calls} sequential one-token Generate calls x {args.rounds} rounds; "
          "process CPU per call (client, server, upstream), median of rounds:")
    for case, figures in cases.items():
        median = statistics.median(figures)
        print(f"  {case:<28} {median:8.1f} us" + (
            f"   (+{median - off:.1f} us)" if case != "off" else "")
              + "   rounds: " + " ".join(f"{f:.0f}" for f in figures))
    print(f"  tracing off, the added checks alone: {_checks():.0f} ns per call")
    print(f"  tracing on, the spans alone (dropped): {_spans(5000, _Drop(), 'x'):.1f} us "
          "per call")
    print(f"  tracing on, a call not sampled (always_off): "
          f"{_spans(5000, _Drop(), 'x', 'always_off'):.1f} us per call")
    if args.otlp_endpoint:
        print(f"  tracing on, the spans alone, OTLP to the collector: "
              f"{_spans(5000, None, args.otlp_endpoint):.1f} us per call")


if __name__ == "__main__":
    asyncio.run(main())
