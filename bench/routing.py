"""Micro-benchmark: gateway CPU that routing adds to one model call, over 4 upstreams.

What one routed call costs beyond the one-upstream path: ``Router.call`` (the candidates
of the model, from the cache), the opener choosing an upstream (health, tier, slots,
loaded model, weights), the in-flight count around the attempt, and the relay's
``attempt_limit`` question. The backends' ``stream`` is a no-op here, so the figure is
routing alone. Run: ``.venv/bin/python bench/routing.py [--calls N]``; it prints
microseconds of CPU per call for each case (the target: at most 20).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from tokenwire.service.backends._breaker import CircuitBreaker
from tokenwire.service.backends._router import Router
from tokenwire.service.backends._upstreams import parse_upstreams
from tokenwire.v1 import generation_pb2 as pb


class _Idle:
    """A backend whose stream opens and closes at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.base_url = f"http://{name}.bench"
        self.breaker = CircuitBreaker(threshold=5)

    def stream(self, request: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._open()

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[None]:
        yield None

    async def models(self, *, deadline: float | None = None) -> list[pb.Model]:
        return [pb.Model(name="smollm2:135m")]

    async def embed(self, request: Any, *, deadline: float | None = None) -> Any:
        raise NotImplementedError

    async def probe(self, *, timeout: float) -> None:  # noqa: ASYNC109
        pass

    async def aclose(self) -> None:
        pass


FILE = "".join(
    f'[upstreams.gpu{i}]\nkind = "ollama"\nurl = "http://10.0.0.{i}:11434"\n'
    f'models = ["smollm2:*", "llama3*"]\nslots = 4\npriority = {0 if i < 3 else 10}\n'
    for i in range(4)) + ('[aliases]\n"chat-small" = [{upstream = "gpu0", model = "smollm2:135m"},'
                          ' {upstream = "gpu3", model = "llama3.2"}]\n')


async def _measure(calls: int, model: str, single: bool, busy: bool) -> float:
    config = parse_upstreams(FILE, "bench.toml")
    router = Router(config, lambda spec: _Idle(spec.name), rng=random.Random(1))
    if busy:  # uneven load, one upstream with the model loaded
        for i, upstream in enumerate(router.upstreams):
            upstream.in_flight = i % 3
        router.upstreams[1].loaded = frozenset({"smollm2:135m"})
    request = pb.GenerateRequest(model=model, prompt="p")
    backend = router.upstreams[0].backend
    started = time.process_time()
    for _ in range(calls):
        if single:
            opened = backend.stream(request)
            async with opened:
                pass
        else:
            call = router.call(request)
            opened = call()
            call.attempt_limit()
            async with opened:
                pass
            _ = call.upstream_name
    return (time.process_time() - started) / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--json", action="store_true", help="one JSON line (for bench/run.py)")
    args = parser.parse_args()
    await _measure(10_000, "smollm2:135m", False, False)  # warm-up
    base = await _measure(args.calls, "smollm2:135m", True, False)
    cases = [("4 upstreams, idle", "smollm2:135m", False),
             ("4 upstreams, uneven load + loaded model", "smollm2:135m", True),
             ("alias over 2 upstreams (request copied)", "chat-small", True)]
    added = {label: await _measure(args.calls, model, False, busy) - base
             for label, model, busy in cases}
    if args.json:
        print(json.dumps({"base_us": round(base, 3),
                          "added_us": {k: round(v, 3) for k, v in added.items()}}))
        return
    print(f"one-upstream path (opener only): {base:.2f} µs CPU per call")
    for label, extra in added.items():
        print(f"{label}: {base + extra:.2f} µs per call, routing adds {extra:.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
