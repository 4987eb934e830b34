"""The shared limits' Redis cost in one process, without gRPC: CPU per model call of
the gate's admission and end (``Gate.check`` + ``Pass.release``, the admission and end
scripts of guard/_shared.py) kept in this process, shared through the limits' own
connection (guard/_resp.py), and shared through redis-py's asyncio client as before it
(the same scripts; registered ``Script`` objects, the admissions of one loop turn in a
pipeline, ends in another).

    python bench/redis_link.py --redis-url redis://127.0.0.1:6379/0 [--workers 1 --gap-ms 0.5]

``--workers`` calls run at once, each admitted, a few loop turns long (``--turns``),
ended, and followed by ``--gap-ms`` of idle time before the next (1 worker with a gap:
every admission and end alone in its loop turn, the worst case; 100 workers: they
share writes). Rounds alternate; each line gives the median of its kind. uvloop, as the
server runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import redis.asyncio as aioredis
import uvloop

from tokenwire.service.guard import _shared
from tokenwire.service.guard._admission import Admission
from tokenwire.service.guard._budget import Budget, Reservation
from tokenwire.service.guard._gate import Gate
from tokenwire.service.guard._shared import ADMITTED, Decision, Lease, SharedLimits
from tokenwire.v1 import generation_pb2 as pb

_key = _shared._key


class RedisPyLimits(SharedLimits):
    """The shared limits as they ran on redis-py (commit 93363f8): the same scripts."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._redis: Any = aioredis.Redis.from_url(url, socket_timeout=0.5,
                                                   socket_connect_timeout=0.5,
                                                   health_check_interval=0)
        self._old_admit = self._redis.register_script(_shared._ADMIT.body)
        self._old_end = self._redis.register_script(_shared._END.body)
        self._admits: list[tuple[list[Any], list[Any], asyncio.Future[Decision]]] = []
        self._ends: list[tuple[list[Any], list[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._ending: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.up = True

    async def aclose(self) -> None:
        await asyncio.sleep(0.05)
        await self._redis.aclose()
        await super().aclose()

    async def admit(self, caller: str, *, model_call: bool, per_caller: int, in_all: int,
                    rate: float, burst: int, reservation: Reservation | None
                    ) -> tuple[Decision, Lease | None]:
        self._serial += 1
        lease = Lease(f"{self._replica}.{self._serial}", _key("c", caller), _key("g"))
        budget = reservation.budget if reservation is not None else Budget()
        keys = [_key("r", caller), _key("c", caller), _key("g"), _key("m", caller),
                _key("d", caller)]
        args = [lease.id, self._ttl_ms, per_caller, in_all, rate, burst, budget.per_minute,
                budget.per_day, reservation.tokens if reservation is not None else 0]
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._admits.append((keys, args, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush_admits())
        decision = await future
        if decision.code == ADMITTED and reservation is not None:
            reservation.day = decision.figure
        return decision, lease

    async def _flush_admits(self) -> None:
        await asyncio.sleep(0)
        batch, self._admits = self._admits, []
        self._flushing = None
        if len(batch) == 1:
            replies = [await self._old_admit(keys=batch[0][0], args=batch[0][1])]
        else:
            pipe = self._redis.pipeline(transaction=False)
            for keys, args, _ in batch:
                await self._old_admit(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        for (_, _, future), reply in zip(batch, replies, strict=True):
            future.set_result(Decision(int(reply[0]), int(reply[1]), int(reply[2])))

    def end(self, caller: str, lease: Lease | None, reservation: Reservation | None,
            used: int) -> None:
        delta = used - reservation.tokens if reservation is not None else 0
        budget = reservation.budget if reservation is not None else Budget()
        self._ends.append(([_key("c", caller), _key("g"), _key("m", caller),
                            _key("d", caller)],
                           [lease.id if lease else "", budget.per_minute, delta,
                            reservation.day if reservation is not None else -1]))
        if self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(self._flush_ends())

    async def _flush_ends(self) -> None:
        await asyncio.sleep(0)
        batch, self._ends = self._ends, []
        self._ending = None
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in batch:
            await self._old_end(keys=keys, args=args, client=pipe)
        await pipe.execute()


async def one_round(kind: str, args: argparse.Namespace) -> float:
    """CPU µs per call of one round."""
    admission = Admission(max_streams=4096, max_streams_per_caller=4096, rate=1e6,
                          burst=1_000_000, queue_timeout=1.0)
    shared: SharedLimits | None = None
    if kind == "link":
        shared = SharedLimits(args.redis_url)
    elif kind == "redis-py":
        shared = RedisPyLimits(args.redis_url)
    if shared is not None:
        await shared.start()
    gate = Gate(admission, shared=shared)
    budget = Budget(1_000_000_000, 100_000_000_000)
    left = args.calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            request = pb.GenerateRequest(model="bench", prompt="a prompt of a few words")
            admitted = await gate.check("bench", anonymous=False, request=request,
                                        model_call=True, max_streams=4096, rate=1e6,
                                        burst=1_000_000, budget=budget, deadline=30.0)
            assert admitted is not None
            for _ in range(args.turns):
                await asyncio.sleep(0)
            admitted.spend.report_tokens(12)
            admitted.release()
            if args.gap_ms:
                await asyncio.sleep(args.gap_ms / 1000)

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(args.workers)))
    used = time.process_time() - started
    if shared is not None:
        await shared.aclose()
    return used / args.calls * 1e6


async def main(args: argparse.Namespace) -> None:
    kinds = ("local", "link", "redis-py")
    rounds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            rounds[kind].append(await one_round(kind, args))
    local = statistics.median(rounds["local"])
    print(f"{args.workers} workers, {args.turns} turns a call, gap {args.gap_ms} ms, "
          f"{args.calls} calls a round, median of {args.rounds} rounds:")
    for kind in kinds:
        cpu = statistics.median(rounds[kind])
        print(f"  {kind:9} {cpu:7.1f} µs CPU/call ({cpu - local:+.1f} over local)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--gap-ms", type=float, default=0.5)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    uvloop.run(main(parser.parse_args()))
