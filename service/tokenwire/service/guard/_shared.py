"""Admission shared by every worker and replica, in Redis (``--redis-url``).

One Lua script decides a model call's admission atomically, on Redis's clock (so the
replicas' clocks do not matter), and changes nothing unless everything fits:

    tw:{lim}:r:<caller>   the caller's request rate: GCRA, the theoretical arrival time
                          (a number of ms) of its next request; expires when it is past
    tw:{lim}:c:<caller>   the caller's running model calls: a sorted set of leases, each
                          scored with the time it expires
    tw:{lim}:g            every running model call (``--max-streams``), the same way
    tw:{lim}:m:<caller>   the minute budget: a hash {level, stamp}, a bucket of tokens
    tw:{lim}:d:<caller>   the day budget: a hash {day, used}, reset on a new UTC day

A call's end is a second script: it drops the leases and settles the budgets to what
the call used. So a call costs two scripts, however many tokens it streams. They go
over one connection of this replica's own (``_resp.Link``), the scripts of one
event-loop turn in one write; an end waits up to 10 ms for the next admission's write
and goes before it, so the two share a system call and the replica's own admissions
always see its ends. (Through redis-py's asyncio client a call cost +870 µs of CPU; see
``_resp`` for the figures.) A replica refreshes its leases every ``LEASE_TTL / 3`` s
in one round trip for all of them; a replica that dies stops refreshing, and its
leases lapse within ``LEASE_TTL`` s, so its calls stop counting. After Redis loses its
data (a restart without persistence), the next refresh writes the leases of the calls
still running back; budgets start again from full.

The keys share the hash tag ``{lim}``, so a Redis Cluster keeps them on one node and
the scripts may touch several.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._budget import Budget, Reservation
from ._resp import Link, Script, Unreachable

__all__ = ["LEASE_TTL", "Decision", "Lease", "SharedLimits", "Unreachable"]

log = logging.getLogger("tokenwire.service")

#: Seconds a lease outlives its last refresh.
LEASE_TTL = 15.0
_PREFIX = "tw:{lim}:"
#: Results of the admission script: 0 admitted; 1 over the rate; 2 the caller's
#: concurrency; 3 the global one; 4/5 the minute/day budget; 6/7 larger than it.
ADMITTED, RATE, CALLER_FULL, GLOBAL_FULL = 0, 1, 2, 3

_ADMIT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local mine, all = tonumber(ARGV[3]), tonumber(ARGV[4])
local rate, burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local tpm, tpd, need = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local tat = 0
if rate > 0 then
  local interval = 1000 / rate
  tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now) + interval
  local allowed = tat - burst * interval
  if now < allowed then return {1, math.ceil(allowed - now), 0} end
end
if lease ~= '' then
  if mine > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    local used = redis.call('ZCARD', KEYS[2])
    if used >= mine then return {2, 1000, used} end
  end
  if all > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
    local used = redis.call('ZCARD', KEYS[3])
    if used >= all then return {3, 1000, used} end
  end
end
local level, day, used = 0, math.floor(now / 86400000), 0
if tpm > 0 then
  if need > tpm then return {6, 0, 0} end
  local b = redis.call('HMGET', KEYS[4], 'level', 'stamp')
  level = tonumber(b[1] or tpm)
  local stamp = tonumber(b[2] or now)
  level = math.min(tpm, level + (now - stamp) * tpm / 60000)
  if need > level then
    return {4, math.ceil((need - level) * 60000 / tpm), math.floor(level)}
  end
end
if tpd > 0 then
  if need > tpd then return {7, 0, 0} end
  local d = redis.call('HMGET', KEYS[5], 'day', 'used')
  if tonumber(d[1] or '-1') == day then used = tonumber(d[2] or '0') end
  if used + need > tpd then
    return {5, (day + 1) * 86400000 - now, tpd - used}
  end
end
if rate > 0 then redis.call('SET', KEYS[1], tat, 'PX', math.ceil(tat - now) + 1) end
if lease ~= '' then
  if mine > 0 then
    redis.call('ZADD', KEYS[2], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
  if all > 0 then
    redis.call('ZADD', KEYS[3], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end
if tpm > 0 then
  redis.call('HSET', KEYS[4], 'level', level - need, 'stamp', now)
  redis.call('PEXPIRE', KEYS[4], 120000)
end
if tpd > 0 then
  redis.call('HSET', KEYS[5], 'day', day, 'used', used + need)
  redis.call('PEXPIRE', KEYS[5], 172800000)
end
return {0, 0, day}
""")

# KEYS: caller leases, global leases, minute bucket, day counter.
# ARGV: lease, tokens per minute, the settlement (used - reserved), the day reserved on.
_END = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local tpm, delta = tonumber(ARGV[2]), tonumber(ARGV[3])
if delta ~= 0 then
  if tpm > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
    local b = redis.call('HMGET', KEYS[3], 'level', 'stamp')
    local level = math.min(tpm, tonumber(b[1]) + (now - tonumber(b[2])) * tpm / 60000)
    redis.call('HSET', KEYS[3], 'level', level - delta, 'stamp', now)
  end
  if tonumber(redis.call('HGET', KEYS[4], 'day') or '-1') == tonumber(ARGV[4]) then
    local used = tonumber(redis.call('HGET', KEYS[4], 'used') or '0')
    redis.call('HSET', KEYS[4], 'used', math.max(used + delta, 0))
  end
end
return 0
""")

# KEYS: pairs of (lease set) for each ARGV lease, in order: ARGV[1] = ttl.
_REFRESH = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return 0
""")


@dataclass(slots=True)
class Decision:
    """The admission script's answer: ``code`` (ADMITTED, RATE, …), how long to wait
    before a retry may succeed (ms), and a figure (running calls, tokens left)."""

    code: int
    retry_ms: int
    figure: int


@dataclass(slots=True)
class Lease:
    id: str
    caller_key: str  # "" when no per-caller limit applied
    global_key: str  # "" when no global limit applied


def _key(kind: str, caller: str = "") -> str:
    return f"{_PREFIX}{kind}:{caller}" if caller else f"{_PREFIX}{kind}"


class SharedLimits:
    """This replica's side of the shared limits."""

    def __init__(self, url: str, *, timeout: float = 0.5, lease_ttl: float = LEASE_TTL) -> None:
        self.url = url
        # A short timeout: an admission waits for Redis at most this long, then applies
        # the --redis-down-* choice; while Redis is down, calls do not wait for it at all.
        self._link = Link(url, timeout=timeout)
        self._link.on_dropped = lambda why: self._set_up(False)  # an end not written
        self._ttl_ms = int(lease_ttl * 1000)
        self._lease_ttl = lease_ttl
        self.up = False
        self._replica = os.urandom(6).hex()
        self._serial = 0
        self._leases: dict[str, Lease] = {}
        self._watch: asyncio.Task[None] | None = None
        self.on_state: Callable[[bool], None] = lambda up: None

    @property
    def where(self) -> str:
        from .._config import redact_url
        return redact_url(self.url)

    @property
    def leases(self) -> int:
        return len(self._leases)

    async def start(self) -> None:
        await self._probe()
        self._watch = asyncio.create_task(self._watching())

    async def aclose(self) -> None:
        if self._link.waiting and self.up:
            # The ends of the last calls, written if Redis is up: answers come in order,
            # so they are all answered when this PING is.
            with contextlib.suppress(Unreachable):
                await self._link.call("PING")
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self._link.aclose()

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            if up:
                log.info("redis at %s is reachable again: limits are shared again", self.where)
            else:
                log.warning("redis at %s is not reachable: limits follow --redis-down-* "
                            "until it is back", self.where)
            self.up = up
            self.on_state(up)

    async def _probe(self) -> None:
        try:
            await self._link.call("PING")
        except Unreachable:
            self._set_up(False)
            return
        self._set_up(True)

    async def _watching(self) -> None:
        """Probes Redis every second, and refreshes the leases (which probes it too) every
        third of their TTL, or at once when Redis is back."""
        since = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self._lease_ttl / 3))
            if not self.up:
                await self._probe()
                since = 0.0  # back (or not yet): write the leases again at once
            if self.up and self._leases and loop.time() - since >= self._lease_ttl / 3:
                since = loop.time()
                await self._refresh_all()
            elif self.up:
                await self._probe()

    async def _refresh_all(self) -> None:
        keys: list[str] = []
        args: list[Any] = [self._ttl_ms]
        for lease in list(self._leases.values()):
            for key in (lease.caller_key, lease.global_key):
                if key:
                    keys.append(key)
                    args.append(lease.id)
        try:
            for i in range(0, len(keys), 512):
                await self._link.evalsha(_REFRESH, keys[i:i + 512],
                                         [args[0], *args[1 + i:513 + i]])
        except Unreachable:
            self._set_up(False)

    # -- admission ------------------------------------------------------------

    async def admit(self, caller: str, *, model_call: bool, per_caller: int, in_all: int,
                    rate: float, burst: int, reservation: Reservation | None
                    ) -> tuple[Decision, Lease | None]:
        """Runs the admission script (pipelined with the others of this loop turn).
        Raises Unreachable when Redis does not answer."""
        lease = None
        if model_call and (per_caller > 0 or in_all > 0):
            self._serial += 1
            lease = Lease(f"{self._replica}.{self._serial}",
                          _key("c", caller) if per_caller > 0 else "",
                          _key("g") if in_all > 0 else "")
        budget = reservation.budget if reservation is not None else Budget()

        def orphan(reply: Any) -> None:
            """The call was cancelled (its caller went away) while Redis admitted it: give
            back its place and its reservation, as a call that used nothing."""
            if reply[0] == ADMITTED:
                if reservation is not None:
                    reservation.day = reply[2]
                self.end(caller, lease, reservation, 0)

        future = self._link.evalsha(_ADMIT, (
            _key("r", caller), _key("c", caller), _key("g"), _key("m", caller),
            _key("d", caller)), (
            lease.id if lease else "", self._ttl_ms, per_caller, in_all, rate, burst,
            budget.per_minute, budget.per_day,
            reservation.tokens if reservation is not None else 0), orphan)
        try:
            reply = await future
        except Unreachable:
            self._set_up(False)
            raise
        self._set_up(True)
        decision = Decision(reply[0], reply[1], reply[2])
        if decision.code == ADMITTED:
            if reservation is not None:
                reservation.day = decision.figure
            if lease is not None:
                self._leases[lease.id] = lease
            return decision, lease
        return decision, None

    # -- the end of a call ------------------------------------------------------

    def end(self, caller: str, lease: Lease | None, reservation: Reservation | None,
            used: int) -> None:
        """Drops the call's leases and settles its reservation, without waiting (the
        call has ended). A failed write leaves the leases to lapse and the reservation
        charged in full: never less than was used."""
        delta = used - reservation.tokens if reservation is not None else 0
        if lease is not None:
            self._leases.pop(lease.id, None)
        if lease is None and not delta:
            return
        budget = reservation.budget if reservation is not None else Budget()
        try:
            self._link.evalsha_post(_END, (
                _key("c", caller), _key("g"), _key("m", caller), _key("d", caller)), (
                lease.id if lease else "", budget.per_minute, delta,
                reservation.day if reservation is not None else -1))
        except Unreachable:  # closed
            self._set_up(False)
