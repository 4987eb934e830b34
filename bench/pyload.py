"""Python readers of the tokenwire benchmark (what a Python user of each path gets).

Same modes, flags and JSON output as the compiled reader (bench/loadgen), for three paths:

- ``ndjson``: httpx straight to the upstream's ``/api/generate`` (path A, the floor);
- ``sse``: httpx to the FastAPI peer's ``/v1/generate`` (path B);
- ``grpc``: ``tokenwire.client.AsyncClient`` (path C1), the library a tokenwire user calls.

Tokens are counted by text: each upstream token is 17 characters (a space and 16 hex
digits holding its emission time, Unix ns), so ``len(text) // 17`` tokens per message
whatever the framing or coalescing.

    python bench/pyload.py --proto grpc --target 127.0.0.1:50051 --mode throughput --streams 100
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import uvloop
from procstat import cpu_ticks  # bench/ is on sys.path: these run as scripts

TOKEN_WIDTH = 17

#: Called with (text, arrival Unix ns); returns False to stop (cancel) the stream.
OnText = Callable[[str, int], bool]


class Stopped(Exception):
    """The reader stopped the stream on purpose."""


class Path:
    async def run(self, prompt: str, on_text: OnText) -> bool:
        """Runs one stream; True when it ended with a final done message."""
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class HttpPath(Path):
    def __init__(self, target: str, sse: bool, model: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=f"http://{target}",
            timeout=httpx.Timeout(connect=10.0, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=4096),
            trust_env=False,
        )
        self.sse = sse
        self.path = "/v1/generate" if sse else "/api/generate"
        self.model = model

    async def run(self, prompt: str, on_text: OnText) -> bool:
        body = orjson.dumps({"model": self.model, "prompt": prompt, "stream": True})
        done = False
        async with self.client.stream("POST", self.path, content=body,
                                      headers={"Content-Type": "application/json"}) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())!r}")
            lines: AsyncIterator[str] = response.aiter_lines()
            async for line in lines:
                if self.sse:
                    if not line.startswith("data: "):
                        continue
                    line = line[6:]
                elif not line:
                    continue
                arrival = time.time_ns()
                chunk = orjson.loads(line)
                if "error" in chunk:
                    raise RuntimeError(f"error in stream: {chunk['error']}")
                text = chunk.get("text" if self.sse else "response") or ""
                if not on_text(text, arrival):
                    raise Stopped  # leaving the block closes the response mid-body
                done = done or chunk.get("done") is True
        return done

    async def aclose(self) -> None:
        await self.client.aclose()


class GrpcPath(Path):
    def __init__(self, target: str, model: str, resumable: bool = False,
                 token: str = "") -> None:
        from tokenwire.client import AsyncClient

        self.client = AsyncClient(target, metadata=(
            (("authorization", f"Bearer {token}"),) if token else ()))
        self.model = model
        self.resumable = resumable
        #: The stream id of the last resumable stream read.
        self.last_id: str | None = None

    async def run(self, prompt: str, on_text: OnText) -> bool:
        done = False
        async with self.client.generate(self.model, prompt,
                                        resumable=self.resumable) as stream:
            async for token in stream:
                arrival = time.time_ns()
                if not on_text(token.text, arrival):
                    raise Stopped  # leaving the block cancels the call
                done = done or token.done
            self.last_id = stream.stream_id
        return done

    async def aclose(self) -> None:
        await self.client.aclose()


def quantiles(xs: list[int]) -> dict[str, float]:
    out: dict[str, float] = {"n": float(len(xs))}
    if not xs:
        return out
    xs.sort()

    def at(q: float) -> float:
        return float(xs[max(math.ceil(q * len(xs)) - 1, 0)])

    out.update(p50=at(0.5), p90=at(0.9), p99=at(0.99), p999=at(0.999),
               min=float(xs[0]), max=float(xs[-1]), mean=sum(xs) / len(xs))
    return out


def prompt(tokens: int, interval_us: float, id_: str = "") -> str:
    p = f"bench tokens={tokens} interval_us={interval_us:g}"
    return p + (f" id={id_}" if id_ else "")


async def throughput(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    phase = "warming"
    in_window = 0
    messages = 0
    errors = 0
    completed = 0
    completed_in_window = 0
    samples: list[str] = []
    latencies: list[int] = []
    paced = args.interval_us > 0

    async def worker(w: int) -> None:
        nonlocal in_window, errors, completed, completed_in_window
        if args.ramp > 0:
            await asyncio.sleep(w / args.streams * args.ramp)
        while phase != "over":
            got = 0
            ntext = 0

            def on_text(text: str, arrival: int) -> bool:
                nonlocal got, ntext, in_window, messages
                n = len(text) // TOKEN_WIDTH
                got += n
                ntext += len(text)
                if phase == "measuring":
                    in_window += n
                    messages += 1
                    if paced:
                        for i in range(0, n * TOKEN_WIDTH, TOKEN_WIDTH):
                            latencies.append(arrival - int(text[i + 1:i + TOKEN_WIDTH], 16))
                return True

            err: BaseException | None = None
            done = False
            try:
                done = await path.run(prompt(args.tokens, args.interval_us), on_text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # counted, reported, and the worker goes on
                err = exc
            if phase == "over":
                return
            if err is not None or not done or got != args.tokens or ntext != got * TOKEN_WIDTH:
                errors += 1
                if len(samples) < 5:
                    samples.append(f"err={err!r} done={done} tokens={got}/{args.tokens}")
                if err is not None:
                    await asyncio.sleep(0.01)
            else:
                completed += 1
                if phase == "measuring":
                    completed_in_window += 1

    started = time.time()
    workers = [asyncio.create_task(worker(w)) for w in range(args.streams)]  # strong refs
    await asyncio.sleep(args.warmup + args.ramp)
    cpu0 = cpu_ticks(args.server_pid)
    t0 = time.perf_counter()
    phase = "measuring"
    await asyncio.sleep(args.window)
    phase = "over"
    t1 = time.perf_counter()
    cpu1 = cpu_ticks(args.server_pid)
    tokens = in_window
    errors_in_run = errors
    # The streams still open are not waited for: the process exits right after printing
    # (see main), and the kernel closing its sockets is the cancel every server sees.
    elapsed = t1 - t0
    out: dict[str, Any] = {
        "mode": "throughput", "proto": args.proto, "streams": args.streams,
        "tokens_per_stream": args.tokens, "interval_us": args.interval_us,
        "window_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
        "messages": messages,
        "server_cpu_ticks": cpu1 - cpu0, "streams_completed": completed,
        "streams_completed_in_window": completed_in_window,
        "errors": errors_in_run, "error_samples": samples, "started_unix": int(started),
        "workers": len(workers),
    }
    if paced:
        out["latency_ns"] = quantiles(latencies)
    return out


async def ttft(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    samples: list[int] = []
    errors = 0
    for i in range(args.warmup_requests + args.requests):
        first = 0

        def on_text(text: str, arrival: int) -> bool:
            nonlocal first
            if not first and text:
                first = arrival
            return True

        t0 = time.time_ns()
        try:
            done = await path.run(prompt(args.tokens, args.interval_us), on_text)
        except Exception:
            done = False
        if not done or not first:
            errors += 1
            continue
        if i >= args.warmup_requests:
            samples.append(first - t0)
    return {"mode": "ttft", "proto": args.proto, "errors": errors, "ttft_ns": quantiles(samples)}


async def resume(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Reads a resumable stream to its end, then times a Resume from chunk 0 to its first
    replayed text (the replay path: no upstream involved)."""
    assert isinstance(path, GrpcPath) and path.resumable
    samples: list[int] = []
    errors = 0
    for i in range(args.warmup_requests + args.requests):
        try:
            done = await path.run(prompt(args.tokens, args.interval_us), lambda *_: True)
            assert done and path.last_id
            t0 = time.time_ns()
            first = 0
            async with path.client.resume(path.last_id) as stream:
                async for token in stream:
                    if token.text and not first:
                        first = time.time_ns()
        except Exception:
            errors += 1
            continue
        if i >= args.warmup_requests and first:
            samples.append(first - t0)
    return {"mode": "resume", "proto": args.proto, "errors": errors,
            "first_replayed_ns": quantiles(samples)}


async def cancel(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    cancel_at: dict[str, int] = {}
    errors = 0
    for i in range(args.warmup_requests + args.requests):
        id_ = f"{args.id_prefix}-{i}"
        seen = 0
        tc = 0

        def on_text(text: str, arrival: int) -> bool:
            nonlocal seen, tc
            seen += len(text) // TOKEN_WIDTH
            if seen >= args.cancel_after:
                tc = time.time_ns()
                return False
            return True

        try:
            await path.run(prompt(args.tokens, args.interval_us, id_), on_text)
            errors += 1  # ran to the end: the cancel never happened
        except Stopped:
            if i >= args.warmup_requests:
                cancel_at[id_] = tc
        except Exception:
            errors += 1
    # Ask until every cancelled stream's close reached the upstream (a late close is a
    # sample too, however late), for at most 10 s.
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            stats = (await client.get(args.stats_url,
                                      params={"prefix": args.id_prefix + "-"})).json()
            records = stats.get("records", {})
            if all((records.get(i) or {}).get("disconnect_ns") for i in cancel_at) \
                    or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    deltas = []
    missing = 0
    for id_, tc in cancel_at.items():
        rec = records.get(id_)
        if not rec or not rec.get("disconnect_ns"):
            missing += 1
            continue
        deltas.append(rec["disconnect_ns"] - tc)
    return {"mode": "cancel", "proto": args.proto, "errors": errors, "never_closed": missing,
            "cancel_to_close_ns": quantiles(deltas)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    path: Path
    if args.proto == "grpc":
        path = GrpcPath(args.target, args.model, args.resumable, args.token)
    else:
        path = HttpPath(args.target, args.proto == "sse", args.model)
    mode = {"throughput": throughput, "ttft": ttft, "cancel": cancel,
            "resume": resume}[args.mode]
    out = await mode(args, path)
    if args.mode != "throughput":
        await path.aclose()
    out["reader"] = "python"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("throughput", "ttft", "cancel", "resume"),
                        default="throughput")
    parser.add_argument("--resumable", type=lambda v: v.lower() in ("1", "true", "yes"),
                        default=False, help="grpc: ask for resumable streams")
    parser.add_argument("--proto", choices=("grpc", "ndjson", "sse"), default="grpc")
    parser.add_argument("--token", default="", help="grpc: a bearer token to send")
    parser.add_argument("--target", required=True, help="host:port (loopback)")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--stats-url", default="")
    parser.add_argument("--id-prefix", default="cancel")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--interval-us", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--ramp", type=float, default=0.0)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup-requests", type=int, default=20)
    parser.add_argument("--cancel-after", type=int, default=5)
    parser.add_argument("--server-pid", type=int, default=0)
    args = parser.parse_args()
    host = args.target.rpartition(":")[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        parser.error("the benchmark is loopback-only")
    os.environ.pop("http_proxy", None)
    out = uvloop.run(main_async(args))
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip tearing down up to 1000 open streams one by one


if __name__ == "__main__":
    main()
