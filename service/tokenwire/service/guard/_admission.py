"""Admission control: concurrent model calls (global and per caller) and a
per-caller request rate (token bucket).

Ollama queues requests for a loaded model without limit or timeout, so this is
the only place where pressure can be pushed back. Over a limit a call either
waits in a bounded queue (``queue_timeout`` > 0, never past its deadline) or is
refused at once with RESOURCE_EXHAUSTED and a retry hint.

Identified callers (a bearer token, a client certificate) get the per-caller
limits. Anonymous callers (no authentication configured) can be told apart only
by peer address, and an address is not an identity: every service behind one
NAT, Kubernetes node or sidecar proxy shares it, so a per-caller limit meant for
one caller would throttle all of them together (one internal service opening
2,000 streams had 1,744 refused at the old default of 256). They have limits of
their own, per peer address, off by default (``max_streams_per_peer`` and
``rate_per_peer`` 0): then only the global limit applies to them.

Per-caller state lives only while it matters: a caller's slots are dropped when
its last call ends, and its rate bucket once it has refilled, so a stream of
distinct callers (anonymous ones are keyed by peer address) does not grow them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Admission", "Overloaded", "Ticket"]


class Overloaded(Exception):
    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message)
        self.message = message
        #: Seconds after which a retry may succeed; None: it will not, as it is.
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    full_at: float  # when it is back at its burst if nothing else is taken

#: Full rate buckets are swept out at most this often (seconds).
_SWEEP_INTERVAL = 10.0


class _Slots:
    """A counting limit with a FIFO of waiters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return True
        return False

    async def take(self, wait: float) -> bool:
        """Takes a slot, waiting up to ``wait`` seconds in FIFO order."""
        if self.try_take():
            return True
        if wait <= 0:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except BaseException as exc:
            granted = waiter.done() and not waiter.cancelled()
            if isinstance(exc, TimeoutError):
                if granted:  # handed over just as the wait ran out: keep it
                    return True
                self._remove(waiter)
                return False
            if granted:
                self.give()
            else:
                self._remove(waiter)
            raise
        return True

    @property
    def idle(self) -> bool:
        return not self.used and not self._waiters

    def _remove(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the waiter
                return
        self.used -= 1


class Ticket:
    """Held for the length of one admitted call; ``release`` is idempotent."""

    def __init__(self, slots: tuple[_Slots, ...], on_release: Callable[[], None]) -> None:
        self._slots = slots
        self._on_release = on_release

    def release(self) -> None:
        slots, self._slots = self._slots, ()
        for s in slots:
            s.give()
        if slots:
            self._on_release()


class Admission:
    def __init__(self, *, max_streams: int, max_streams_per_caller: int, rate: float,
                 burst: int, queue_timeout: float, max_streams_per_peer: int = 0,
                 rate_per_peer: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._global = _Slots(max_streams)
        self._per_caller_default = max_streams_per_caller
        self._per_peer = max_streams_per_peer
        self._rate_per_peer = rate_per_peer
        self._per_caller: dict[str, _Slots] = {}
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._queue_timeout = queue_timeout
        self._clock = clock
        self._next_sweep = clock() + _SWEEP_INTERVAL

    @property
    def in_use(self) -> int:
        return self._global.used

    @property
    def callers_tracked(self) -> int:
        """Callers with per-caller state (running calls or a refilling rate bucket)."""
        return len(self._per_caller.keys() | self._buckets.keys())

    def check_rate(self, caller: str, rate: float | None = None, burst: int | None = None,
                   *, anonymous: bool = False) -> None:
        """Takes one request from the caller's bucket or raises Overloaded. An
        ``anonymous`` caller is a peer address, limited by ``rate_per_peer``."""
        if rate is None:
            rate = self._rate_per_peer if anonymous else self._rate
        burst = self._burst if burst is None else burst
        if rate <= 0:
            return
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = _Bucket(float(burst), now, now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            raise self.over_rate(caller, anonymous, rate, burst, (1.0 - bucket.tokens) / rate)
        bucket.tokens -= 1.0
        bucket.full_at = now + (float(burst) - bucket.tokens) / rate

    @property
    def queue_timeout(self) -> float:
        return self._queue_timeout

    def figures(self, *, max_streams: int | None, rate: float | None, burst: int | None,
                anonymous: bool) -> tuple[int, int, float, int]:
        """The limits that apply to a caller: its concurrent model calls (0 = none of its
        own), those in all, its request rate (0 = none) and burst."""
        per_caller = self._per_peer if anonymous else max_streams or self._per_caller_default
        if rate is None:
            rate = self._rate_per_peer if anonymous else self._rate
        return (max(per_caller, 0), self._global.limit, rate,
                self._burst if burst is None else burst)

    @staticmethod
    def over_rate(caller: str, anonymous: bool, rate: float, burst: int,
                  wait: float) -> Overloaded:
        return Overloaded(f"{_who(caller, anonymous)} is over its rate limit of {rate:g} "
                          f"requests/s (burst {burst}"
                          + ("; --rate-per-peer" if anonymous else "")
                          + f"); retry in {wait:.2f}s", retry_after=wait)

    @staticmethod
    def caller_full(caller: str, anonymous: bool, used: int, limit: int) -> Overloaded:
        which = "--max-streams-per-peer" if anonymous else "max streams per caller"
        return Overloaded(f"{_who(caller, anonymous)} already has {used} model calls "
                          f"running, its limit ({which}: {limit}); retry when one ends",
                          retry_after=1.0)

    @staticmethod
    def full(limit: int) -> Overloaded:
        return Overloaded(f"the gateway is at its limit of {limit} concurrent model calls; "
                          "retry shortly", retry_after=1.0)

    def _sweep(self, now: float) -> None:
        """Drops the buckets that have refilled: a new one starts full anyway."""
        self._next_sweep = now + _SWEEP_INTERVAL
        for caller in [c for c, b in self._buckets.items() if b.full_at <= now]:
            del self._buckets[caller]

    def _forget_if_idle(self, caller: str) -> None:
        slots = self._per_caller.get(caller)
        if slots is not None and slots.idle:
            del self._per_caller[caller]

    async def admit(self, caller: str, *, max_streams: int | None = None,
                    anonymous: bool = False, deadline: float | None = None) -> Ticket:
        """Takes a global and a per-caller slot, waiting at most the queue
        timeout (and never past ``deadline``, seconds from now). An ``anonymous``
        caller is a peer address: ``max_streams_per_peer`` applies, and when that is
        0 only the global limit does."""
        wait = self._queue_timeout if deadline is None else min(self._queue_timeout, deadline)
        limit = self._per_peer if anonymous else max_streams or self._per_caller_default
        if limit <= 0:
            if not await self._global.take(wait):
                raise self._full()
            return Ticket((self._global,), _nothing)
        mine = self._per_caller.setdefault(caller, _Slots(limit))
        mine.limit = limit  # follows a reloaded policy
        if not await mine.take(wait):
            self._forget_if_idle(caller)
            raise self.caller_full(caller, anonymous, mine.used, mine.limit)
        try:
            admitted = await self._global.take(wait)
        except BaseException:
            mine.give()  # cancelled (or past its deadline) while queued
            self._forget_if_idle(caller)
            raise
        if not admitted:
            mine.give()
            self._forget_if_idle(caller)
            raise self._full()
        return Ticket((self._global, mine), lambda: self._forget_if_idle(caller))

    def _full(self) -> Overloaded:
        return self.full(self._global.limit)


def _nothing() -> None:
    pass


def _who(caller: str, anonymous: bool) -> str:
    """How a refusal names the caller: ``caller 'name'`` or ``peer 10.0.0.7``."""
    return f"peer {caller.removeprefix('peer:')}" if anonymous else f"caller '{caller}'"
