"""CPU per streamed line of the HTTP clients a backend could stream with.

    .venv/bin/python bench/transport.py --bin-dir ~/.cache/tokenwire/bench [--streams 100]

Starts the Go upstream (bench/upstream, Ollama's NDJSON at zero delay), then reads
``--streams`` concurrent answers of ``--tokens`` lines each with every client, each
client in a process of its own (uvloop), several rounds interleaved, and prints the
client process's CPU time (user + system) per line, median over the rounds:

    lean      tokenwire's backends._transport
    legacy    the same client code from another checkout (``--legacy DIR``, e.g. a
              ``git worktree`` of 237b8d5, the hand-written HTTP/1.1 parser llhttp replaced)
    aiohttp   aiohttp's client, iterating the body's lines (its C parser)
    httpx     httpx's AsyncClient, aiter_lines

Each line is decoded by the Ollama backend's own decoder in every client, so the
figures differ by the HTTP and framing work alone. The run that chose llhttp for
the transport (2 shared cores, 100 streams x 2000 lines) is in the README,
Performance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _lean(url: str, streams: int, tokens: int) -> int:
    from tokenwire.service.backends import _transport
    from tokenwire.service.backends.ollama._answers import generate_event

    body = json.dumps({"model": "bench", "prompt": f"tokens={tokens}"}).encode()
    if hasattr(_transport, "StreamPool"):
        pool = _transport.StreamPool(url, connect_timeout=5, max_connections=streams)
        framing: object = ("ndjson", generate_event)
    else:  # the hand-written parser it replaced (NDJSONPool)
        pool = _transport.NDJSONPool(url, connect_timeout=5, max_connections=streams)
        framing = generate_event

    async def one() -> int:
        response = await pool.open("/api/generate", body, framing)
        count = 0

        def sink(event: object, size: int) -> bool:
            nonlocal count
            count += 1
            return False

        try:
            await response.deliver(sink)
        finally:
            pool.release(response)
        return count

    got = await asyncio.gather(*(one() for _ in range(streams)))
    pool.close()
    return sum(got)


async def _aiohttp(url: str, streams: int, tokens: int) -> int:
    import aiohttp

    from tokenwire.service.backends.ollama._answers import generate_event

    payload = {"model": "bench", "prompt": f"tokens={tokens}"}
    connector = aiohttp.TCPConnector(limit=streams)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            count = 0
            async with session.post(url + "/api/generate", json=payload) as response:
                async for line in response.content:
                    if line.strip():
                        generate_event(line)
                        count += 1
            return count

        got = await asyncio.gather(*(one() for _ in range(streams)))
    return sum(got)


async def _httpx(url: str, streams: int, tokens: int) -> int:
    import httpx

    from tokenwire.service.backends.ollama._answers import generate_event

    payload = {"model": "bench", "prompt": f"tokens={tokens}"}
    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(limits=limits, timeout=None) as client:

        async def one() -> int:
            count = 0
            async with client.stream("POST", url + "/api/generate", json=payload) as response:
                async for line in response.aiter_lines():
                    if line.strip():
                        generate_event(line.encode())
                        count += 1
            return count

        got = await asyncio.gather(*(one() for _ in range(streams)))
    return sum(got)


CLIENTS = {"lean": _lean, "aiohttp": _aiohttp, "httpx": _httpx}


def _child(name: str, url: str, streams: int, tokens: int) -> None:
    """Runs one client in this process; prints lines and CPU seconds as JSON."""
    import uvloop

    async def run() -> tuple[int, float, float]:
        await CLIENTS[name](url, 2, 10)  # warm up: imports, first connections
        cpu, wall = _cpu(), time.perf_counter()
        lines = await CLIENTS[name](url, streams, tokens)
        return lines, _cpu() - cpu, time.perf_counter() - wall

    lines, cpu, wall = uvloop.run(run())
    print(json.dumps({"lines": lines, "cpu": cpu, "wall": wall}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", required=True, help="where bench/upstream was built")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="lean,aiohttp,httpx")
    parser.add_argument("--legacy", default="", help="checkout whose client and service "
                        "directories the 'legacy' client imports")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.url, args.streams, args.tokens)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        upstream = subprocess.Popen([str(Path(args.bin_dir) / "upstream"), "-listen",
                                     "127.0.0.1:0", "-port-file", str(port_file)])
        try:
            for _ in range(200):
                if port_file.exists() and port_file.read_text().strip():
                    break
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
            names = args.clients.split(",") + (["legacy"] if args.legacy else [])
            results: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.rounds):
                for name in names:
                    env = dict(os.environ)
                    if name == "legacy":
                        root = Path(args.legacy)
                        env["PYTHONPATH"] = f"{root / 'client'}:{root / 'service'}"
                    out = subprocess.run(
                        [sys.executable, __file__, "--bin-dir", args.bin_dir, "--child",
                         "lean" if name == "legacy" else name, "--url", url, "--streams",
                         str(args.streams), "--tokens", str(args.tokens)],
                        capture_output=True, text=True, check=True, env=env)
                    got = json.loads(out.stdout)
                    assert got["lines"] == args.streams * (args.tokens + 1), got  # + the final
                    results[name].append(got["cpu"] / got["lines"] * 1e6)
        finally:
            upstream.terminate()
            upstream.wait()
    base = statistics.median(results[names[0]])
    print(f"{args.streams} streams x {args.tokens} lines, {args.rounds} rounds, client CPU "
          "per line (median; every round):")
    for name in names:
        mid = statistics.median(results[name])
        rounds = ", ".join(f"{v:.2f}" for v in results[name])
        print(f"  {name:<8} {mid:6.2f} µs  ({mid / base:.2f}x {names[0]})  [{rounds}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
