"""A slow reader does not make the gateway buffer without bound: the upstream is
held back by flow control (it advances only as fast as the caller reads) and the
gateway's memory stays flat."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from typing import Any

import grpc

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

PIECES = 100_000
PIECE_BYTES = 4096
READ_EVERY = 0.5  # seconds between two reads of the slow caller
READS = 10  # ~5 s of slow reading
WINDOW = 2.5  # the last seconds, where upstream and memory must be flat
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


async def test_slow_reader_is_flow_controlled(make_runtime: MakeRuntime, fake: FakeOllama,
                                              figures: dict[str, Any]) -> None:
    runtime = await make_runtime()
    # 4 KiB pieces (one shared string): 400 MiB if the gateway read it all.
    fake.tokens = ["x" * (PIECE_BYTES - 1) + " "] * PIECES
    fake.token_delay = 0.0  # as fast as the socket takes it
    samples: list[dict[str, float]] = []
    consumed = 0
    tracemalloc.start()
    try:
        async with grpc.aio.insecure_channel(runtime.target) as channel:
            call = GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(model="tiny", prompt="p"), timeout=60)
            started = time.perf_counter()
            first = await call.read()
            consumed += first.chunk_count
            record = fake.streams[-1]

            def sample() -> None:
                samples.append({"t": time.perf_counter() - started,
                                "upstream_sent": record.chunks_sent, "consumed": consumed,
                                "traced": tracemalloc.get_traced_memory()[0], "rss": _rss()})

            for _ in range(READS):
                for _ in range(2):
                    await asyncio.sleep(READ_EVERY / 2)
                    sample()
                token = await call.read()
                consumed += token.chunk_count
            sample()
            call.cancel()
            await fake.wait_for_disconnect()
    finally:
        tracemalloc.stop()

    window = [s for s in samples if s["t"] >= samples[-1]["t"] - WINDOW]
    sent_growth = window[-1]["upstream_sent"] - window[0]["upstream_sent"]
    read_growth = window[-1]["consumed"] - window[0]["consumed"]
    traced = [s["traced"] for s in window]
    rss = [s["rss"] for s in window]
    print(f"\nslow reader: {PIECES} pieces upstream, caller reads one message every "
          f"{READ_EVERY} s for {samples[-1]['t']:.1f} s")
    print("   t(s)  upstream sent  caller got  traced MiB  RSS MiB")
    for s in samples:
        print(f"  {s['t']:5.2f}  {s['upstream_sent']:13.0f}  {s['consumed']:10.0f}  "
              f"{s['traced'] / 2**20:10.2f}  {s['rss'] / 2**20:7.1f}")
    print(f"  last {WINDOW:g} s: upstream advanced {sent_growth:.0f} chunks while the caller took "
          f"{read_growth:.0f}; traced memory range {(max(traced) - min(traced)) / 2**20:.2f} "
          f"MiB, RSS range {(max(rss) - min(rss)) / 2**20:.1f} MiB")
    figures["slow_reader"] = {
        "pieces": PIECES, "piece_bytes": PIECE_BYTES, "window_s": WINDOW,
        "read_every_s": READ_EVERY, "seconds": round(samples[-1]["t"], 2),
        "upstream_sent_final": samples[-1]["upstream_sent"],
        "caller_consumed_final": samples[-1]["consumed"],
        "window_upstream_growth": sent_growth, "window_caller_growth": read_growth,
        "traced_mib_range_window": round((max(traced) - min(traced)) / 2**20, 3),
        "traced_mib_peak": round(max(s["traced"] for s in samples) / 2**20, 3),
        "rss_mib_range_window": round((max(rss) - min(rss)) / 2**20, 2)}
    # Held back: far from the whole answer, and advancing only as the caller reads.
    assert samples[-1]["upstream_sent"] < PIECES / 4
    assert sent_growth <= read_growth + 2048
    # Memory flat while the caller crawls.
    assert max(traced) - min(traced) < 4 * 2**20
    assert max(rss) - min(rss) < 16 * 2**20
