"""The limits a call passes, in one place: request rate, concurrent model calls (the
caller's and in all) and token budgets, kept in this process or, with ``--redis-url``,
shared by every worker and replica (``_shared``).

Redis unreachable (or slower than its 0.5 s timeout): each kind of limit does what its
``--redis-down-*`` flag says, until Redis answers again (it is probed every second,
so calls do not wait for it meanwhile):

    local    apply it in this process, as without Redis (each replica by itself: N
             replicas let a caller through up to N times) — concurrency and rate
    open     do not apply it
    closed   refuse the calls it applies to, UNAVAILABLE (LIMITS_STORE_UNAVAILABLE) —
             budgets: a budget that cannot be checked is not spent
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from ._admission import Admission, Overloaded, Ticket
from ._budget import Budget, LocalBudgets, Reservation, Spend, plan_reservation, refusal
from ._shared import ADMITTED, CALLER_FULL, GLOBAL_FULL, RATE, Lease, SharedLimits, Unreachable

__all__ = ["FALLBACKS", "Fallback", "Gate", "LimitsUnavailable", "Pass"]

FALLBACKS = ("local", "open", "closed")


class LimitsUnavailable(Exception):
    """A limit that fails closed could not be checked: its store is unreachable."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = 1.0


@dataclass(frozen=True, slots=True)
class Fallback:
    """What each kind of limit does while Redis is unreachable."""

    streams: str = "local"
    rate: str = "local"
    budgets: str = "closed"


class Pass:
    """Held for the length of one admitted model call; ``release`` (idempotent) gives
    back its slots and settles its reservation to what ``spend`` says it used."""

    __slots__ = ("_caller", "_gate", "_lease", "_local", "_reservation", "_shared", "spend")

    def __init__(self, gate: Gate | None, caller: str, *, local: Ticket | None = None,
                 lease: Lease | None = None, shared: bool = False,
                 reservation: Reservation | None = None) -> None:
        self._gate = gate
        self._caller = caller
        self._local = local
        self._lease = lease
        self._shared = shared  # decided in Redis: ended there too
        self._reservation = reservation
        self.spend = Spend()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is None:
            return
        if self._local is not None:
            self._local.release()
        gate.ended(self)


class Gate:
    def __init__(self, admission: Admission, *, shared: SharedLimits | None = None,
                 fallback: Fallback | None = None, server_output_cap: int = 0,
                 budgets: LocalBudgets | None = None, on_budget: Any = None) -> None:
        self.admission = admission
        self.shared = shared
        self.fallback = fallback or Fallback()
        self._cap = server_output_cap
        self._budgets = budgets or LocalBudgets()
        #: Called with (event, tokens): "reserved", "settled" (the used tokens),
        #: "refused_minute", "refused_day".
        self.on_budget = on_budget or (lambda event, tokens: None)
        self._live = 0

    @property
    def in_use(self) -> int:
        """Model calls admitted in this process and not ended yet."""
        return self._live

    def _shared_up(self) -> bool:
        return self.shared is not None and self.shared.up

    async def check(self, principal: str, *, anonymous: bool, request: Any,
                    model_call: bool, max_streams: int | None = None,
                    rate: float | None = None, burst: int | None = None,
                    budget: Budget | None = None, output_cap: int | None = None,
                    deadline: float | None = None) -> Pass | None:
        """Applies the limits to one call: its request rate, and for a model call its
        concurrency and budget. Returns the Pass of an admitted model call (None for
        other calls); raises Overloaded (BudgetExceeded) or LimitsUnavailable."""
        admission = self.admission
        per_caller, in_all, rate, burst = admission.figures(
            max_streams=max_streams, rate=rate, burst=burst, anonymous=anonymous)
        reservation = None
        if model_call and budget:
            reservation = plan_reservation(request, caller=principal, budget=budget,
                                           caller_cap=output_cap, server_cap=self._cap)
        if self._shared_up() and (model_call or rate > 0):
            try:
                return await self._shared_check(principal, anonymous, model_call, per_caller,
                                                in_all, rate, burst, reservation, deadline)
            except Unreachable:
                pass  # follow the --redis-down-* choices below
        return await self._local_check(principal, anonymous, model_call, per_caller, rate,
                                       burst, reservation, deadline)

    async def _shared_check(self, principal: str, anonymous: bool, model_call: bool,
                            per_caller: int, in_all: int, rate: float, burst: int,
                            reservation: Reservation | None, deadline: float | None
                            ) -> Pass | None:
        assert self.shared is not None
        loop = asyncio.get_running_loop()
        wait = self.admission.queue_timeout if deadline is None else min(
            self.admission.queue_timeout, deadline)
        until = loop.time() + wait
        while True:
            decision, lease = await self.shared.admit(
                principal, model_call=model_call, per_caller=per_caller, in_all=in_all,
                rate=rate, burst=burst, reservation=reservation)
            code = decision.code
            if code == ADMITTED:
                if not model_call:
                    return None
                if reservation is not None:
                    self.on_budget("reserved", reservation.tokens)
                self._live += 1
                return Pass(self, principal, lease=lease, shared=True, reservation=reservation)
            if code == RATE:
                raise self.admission.over_rate(principal, anonymous, rate, burst,
                                               decision.retry_ms / 1000)
            if code in (CALLER_FULL, GLOBAL_FULL):
                left = until - loop.time()
                if left > 0:  # queue: look again shortly (another replica may release)
                    await asyncio.sleep(min(left, random.uniform(0.02, 0.06)))
                    continue
                if code == CALLER_FULL:
                    raise self.admission.caller_full(principal, anonymous, decision.figure,
                                                     per_caller)
                raise self.admission.full(in_all)
            assert reservation is not None
            self.on_budget("refused_day" if code in (5, 7) else "refused_minute", 0)
            raise refusal(code, reservation, decision.figure, decision.retry_ms)

    async def _local_check(self, principal: str, anonymous: bool, model_call: bool,
                           per_caller: int, rate: float, burst: int,
                           reservation: Reservation | None, deadline: float | None
                           ) -> Pass | None:
        """In this process: without Redis, or while it is down (``fallback``)."""
        down = self.shared is not None
        fallback = self.fallback
        where = self.shared.where if self.shared is not None else ""
        if not down or fallback.rate == "local":
            self.admission.check_rate(principal, rate, burst, anonymous=anonymous)
        elif fallback.rate == "closed" and rate > 0:
            raise LimitsUnavailable(f"request rates are shared in Redis at {where}, which is "
                                    "not reachable now (--redis-down-rate closed); retry "
                                    "shortly")
        if not model_call:
            return None
        if reservation is not None and down and fallback.budgets != "local":
            if fallback.budgets == "closed":
                raise LimitsUnavailable(
                    f"caller '{principal}' has a token budget, kept in Redis at {where}, "
                    "which is not reachable now (--redis-down-budgets closed); retry "
                    "shortly")
            reservation = None  # open: not counted
        if reservation is not None:
            try:
                self._budgets.reserve(reservation)
            except Overloaded as exc:
                self.on_budget("refused_" + getattr(exc, "window", "minute"), 0)
                raise
            self.on_budget("reserved", reservation.tokens)
        try:
            ticket = None
            if not down or fallback.streams == "local":
                ticket = await self.admission.admit(principal, max_streams=per_caller or None,
                                                    anonymous=anonymous, deadline=deadline)
            elif fallback.streams == "closed":
                raise LimitsUnavailable(f"concurrent model calls are counted in Redis at "
                                        f"{where}, which is not reachable now "
                                        "(--redis-down-streams closed); retry shortly")
        except BaseException:
            if reservation is not None:
                self._budgets.settle(reservation, 0)
            raise
        self._live += 1
        return Pass(self, principal, local=ticket, reservation=reservation)

    def ended(self, done: Pass) -> None:
        self._live -= 1
        reservation = done._reservation
        used = done.spend.used(reservation.prompt_estimate) if reservation is not None else 0
        if reservation is not None:
            self.on_budget("settled", used)
        if done._shared:
            assert self.shared is not None
            self.shared.end(done._caller, done._lease, reservation, used)
        elif reservation is not None:
            self._budgets.settle(reservation, used)

