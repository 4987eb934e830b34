"""Token budgets per caller: tokens per minute and per day (the callers file's
``tokens_per_minute`` and ``tokens_per_day``).

A model call reserves its tokens at admission, before the engine sees it, and the
reservation is settled to what the call really used when it ends, however it ends.
So parallel calls can never spend more than the budget holds: each one's reservation
must fit in what is left when it is admitted.

    reservation = prompt estimate + output cap

The output cap is the request's ``options.max_tokens``, else the caller's
``max_output_tokens``, else the server's ``--max-output-tokens``, else
``DEFAULT_OUTPUT_RESERVATION``; the request is given that cap, so the engine never
writes more than was reserved. The prompt estimate is made before the engine has
counted anything (no engine's count comes before its answer, and a tokenize round
trip would be paid by every call): a third of the request's encoded bytes (images
left out), plus ``TOKENS_PER_MESSAGE`` for each chat message (its template) and
``TOKENS_PER_IMAGE`` for each image. BPE vocabularies average about four bytes a token
in English and three in code or accented text, so a third is above the engine's count
for most prompts; where it is below, the call is settled to the engine's count anyway,
and the difference is the only way a budget can be overshot.

Settlement: the engine's own figures (``prompt_tokens`` + ``completion_tokens`` of the
final Token, or an embedding's ``prompt_tokens``) when it sent them; a call that broke
off is charged the prompt estimate plus the chunks it received; one that got no chunk
at all is charged nothing (the engine failed, or was stopped before it wrote).

The minute budget is a bucket holding up to ``tokens_per_minute`` that refills
continuously (``tokens_per_minute`` / 60 a second); the day budget is a counter per UTC
day. A call settled above its reservation takes the bucket below zero, so later calls
wait until it has refilled that much.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenwire.v1 import generation_pb2 as pb

from ._admission import Overloaded

__all__ = ["DEFAULT_OUTPUT_RESERVATION", "Budget", "BudgetExceeded", "LocalBudgets",
           "Reservation", "Spend", "plan_reservation", "stream_request"]

#: Output tokens reserved for a budgeted call when nothing caps them.
DEFAULT_OUTPUT_RESERVATION = 2048
TOKENS_PER_MESSAGE = 8
TOKENS_PER_IMAGE = 1024
BYTES_PER_TOKEN = 3
DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Budget:
    """A caller's budgets; 0 = none."""

    per_minute: int = 0
    per_day: int = 0

    def __bool__(self) -> bool:
        return bool(self.per_minute or self.per_day)


class BudgetExceeded(Overloaded):
    """The reservation does not fit in what the caller's budget has left."""

    def __init__(self, message: str, *, retry_after: float | None, caller: str,
                 window: str) -> None:
        super().__init__(message, retry_after=retry_after)
        self.caller = caller
        #: "minute" or "day".
        self.window = window


@dataclass(slots=True)
class Reservation:
    """What one call reserved, from which budget."""

    caller: str
    budget: Budget
    tokens: int
    prompt_estimate: int
    #: The UTC day (days since the epoch) its day budget was charged on.
    day: int = 0


class Spend:
    """What one call used, as the servicer learns it: the engine's figures when they
    come, else what it can count (``watch``: anything with a chunk ``count``, and
    ``events`` whose last is the final one, such as a resumable stream's log)."""

    __slots__ = ("output", "reported", "source")

    def __init__(self) -> None:
        self.reported: int | None = None
        self.source: Any = None
        #: Output tokens, as the engine counted them (0 until it says).
        self.output = 0

    def report(self, usage: pb.Usage) -> None:
        self.reported = usage.prompt_tokens + usage.completion_tokens
        self.output = usage.completion_tokens

    def report_tokens(self, tokens: int) -> None:
        self.reported = tokens

    def watch(self, source: Any) -> None:
        self.source = source

    def used(self, prompt_estimate: int) -> int:
        if self.reported is not None:
            return self.reported
        source = self.source
        events = getattr(source, "events", None)
        if events:
            final = events[-1][3]
            if final is not None:
                return int(final.usage.prompt_tokens + final.usage.completion_tokens)
        count = int(getattr(source, "count", 0))
        if source is None:  # a unary call the servicer did not report: as estimated
            return prompt_estimate
        return prompt_estimate + count if count else 0


def stream_request(request: Any) -> pb.GenerateRequest | pb.ChatRequest | None:
    """The Generate or Chat request in a model call's request (Complete, Start hold one)."""
    if isinstance(request, pb.GenerateRequest | pb.ChatRequest):
        return request
    if isinstance(request, pb.CompleteRequest | pb.StartRequest):
        kind = request.WhichOneof("request")
        return getattr(request, kind) if kind else None
    return None


def _estimate(request: Any) -> int:
    """The prompt's tokens, estimated from its encoded size (see the module doc)."""
    images = 0
    image_bytes = 0
    messages = 0
    inner = stream_request(request)
    if isinstance(inner, pb.GenerateRequest):
        images = len(inner.images)
        image_bytes = sum(len(i) for i in inner.images)
    elif isinstance(inner, pb.ChatRequest):
        messages = len(inner.messages)
        for message in inner.messages:
            images += len(message.images)
            image_bytes += sum(len(i) for i in message.images)
    size: int = max(request.ByteSize() - image_bytes, 0)
    return (math.ceil(size / BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * messages
            + TOKENS_PER_IMAGE * images)


def plan_reservation(request: Any, *, caller: str, budget: Budget, caller_cap: int | None,
                     server_cap: int) -> Reservation:
    """The reservation for ``request``; gives a streaming request the output cap it
    reserves (when it sets none)."""
    prompt = _estimate(request)
    inner = stream_request(request)
    output = 0
    if inner is not None:
        options = inner.options
        if options.HasField("max_tokens") and options.max_tokens >= 0:
            output = options.max_tokens
        else:
            output = caller_cap or server_cap or DEFAULT_OUTPUT_RESERVATION
            options.max_tokens = output
    return Reservation(caller, budget, prompt + output, prompt)


def _utc_day(now: float) -> int:
    return int(now // DAY)


def until_midnight(now: float) -> float:
    return (math.floor(now / DAY) + 1) * DAY - now


def refusal(code: int, reservation: Reservation, available: int, retry_ms: int
            ) -> BudgetExceeded:
    """The refusal for one of the budget outcomes of an admission (local or shared):
    4/6 the minute budget (6: the reservation is larger than the whole budget), 5/7 the
    day budget."""
    budget, caller, need = reservation.budget, reservation.caller, reservation.tokens
    if code in (6, 7):
        window, whole = ("minute", budget.per_minute) if code == 6 else ("day", budget.per_day)
        return BudgetExceeded(
            f"caller '{caller}' asked for a reservation of {need} tokens (prompt estimate "
            f"{reservation.prompt_estimate} + output cap), more than its whole budget of "
            f"{whole} tokens per {window}; ask for fewer output tokens (options.max_tokens)",
            retry_after=None, caller=caller, window=window)
    window, whole = ("minute", budget.per_minute) if code == 4 else ("day", budget.per_day)
    return BudgetExceeded(
        f"caller '{caller}' has {max(available, 0)} of its {whole} tokens per {window} left, "
        f"and this call reserves {need} (prompt estimate {reservation.prompt_estimate} + "
        f"output cap); retry in {retry_ms / 1000:.2f}s, or ask for fewer output tokens",
        retry_after=retry_ms / 1000, caller=caller, window=window)


@dataclass(slots=True)
class _Account:
    level: float  # the minute bucket
    stamp: float
    day: int
    used_today: int


class LocalBudgets:
    """Budgets kept in this process (no ``--redis-url``, or Redis down with
    ``--redis-down-budgets local``): the same rules as the shared ones."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._accounts: dict[str, _Account] = {}

    def reserve(self, reservation: Reservation) -> None:
        """Charges the reservation or raises BudgetExceeded."""
        budget, need = reservation.budget, reservation.tokens
        now = self._clock()
        day = _utc_day(now)
        account = self._accounts.get(reservation.caller)
        if account is None:
            account = self._accounts[reservation.caller] = _Account(
                float(budget.per_minute), now, day, 0)
        self._refill(account, budget, now)
        if budget.per_minute:
            if need > budget.per_minute:
                raise refusal(6, reservation, 0, 0)
            if need > account.level:
                wait = (need - account.level) / (budget.per_minute / 60.0)
                raise refusal(4, reservation, int(account.level), math.ceil(wait * 1000))
        if budget.per_day:
            if need > budget.per_day:
                raise refusal(7, reservation, 0, 0)
            if account.used_today + need > budget.per_day:
                raise refusal(5, reservation, budget.per_day - account.used_today,
                              math.ceil(until_midnight(now) * 1000))
        account.level -= need
        account.used_today += need
        reservation.day = day

    def settle(self, reservation: Reservation, used: int) -> None:
        account = self._accounts.get(reservation.caller)
        if account is None:
            return
        delta = used - reservation.tokens
        self._refill(account, reservation.budget, self._clock())
        account.level -= delta
        if account.day == reservation.day:
            account.used_today = max(account.used_today + delta, 0)

    def _refill(self, account: _Account, budget: Budget, now: float) -> None:
        day = _utc_day(now)
        if day != account.day:
            account.day, account.used_today = day, 0
        if budget.per_minute:
            account.level = min(float(budget.per_minute), account.level
                                + (now - account.stamp) * budget.per_minute / 60.0)
        account.stamp = now
