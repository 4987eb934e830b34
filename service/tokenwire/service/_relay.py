"""Moves chunks from one upstream stream to one caller.

A reader task owns the upstream response. Each parsed chunk is appended to a
pending list and wakes the writer (the RPC handler); on the lean http:// path
that happens right in the socket callback (``Response.deliver``), so no task
runs per chunk except the writer. The writer takes everything pending at once:
a caller that keeps up gets one message per chunk with no added delay; a caller
that falls behind gets fewer, larger messages (adaptive coalescing: no timer
ever waits for more). When the pending list is full, reading stops, so upstream
TCP flow control holds back a fast model and memory stays bounded for a slow
caller.

The reader also enforces the first-token wait and the idle limit with one timer
that is re-armed only when it fires, not once per chunk.

Attempts: an outage before the first chunk is retried (``retries``, with backoff);
with several upstreams, a ``Failover`` (the router's per-call ``Call``) sends each
attempt to the next candidate at once, and may give an attempt its own first-token
limit. All of it happens before the first chunk, so the caller never sees an
attempt's output twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from ._exceptions import FirstTokenTimeout, IdleTimeout, UpstreamError
from .backends._base import Event, Final
from .backends._choice import reason_of
from .backends._transport import Response

log = logging.getLogger("tokenwire.service")

__all__ = ["Failover", "Opener", "Relay", "retry_delay"]

#: Yields each event with the size of its frame in bytes.
Opener = Callable[[], AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]]
_RNG = random.Random()


class Failover(Protocol):
    """How a call with several candidate upstreams moves between them."""

    def attempt_limit(self) -> float | None:
        """Seconds the attempt just opened may wait for its first chunk before the call
        moves on (None: the whole first-token wait)."""

    def expired(self, limit: float) -> UpstreamError:
        """The error of an attempt whose own limit ran out."""

    def failed(self, exc: UpstreamError) -> bool:
        """True when another upstream takes the next attempt now (no backoff); says so
        in the log."""


def retry_delay(attempt: int, backoff: float, rng: random.Random = _RNG) -> float:
    """Seconds to wait before retry number ``attempt`` (from 1): full jitter, uniform
    in [0, backoff * 2 ** (attempt - 1)]."""
    return rng.uniform(0.0, backoff * 2 ** (attempt - 1))


class Relay:
    def __init__(
        self,
        opener: Opener,
        *,
        first_token_timeout: float,
        idle_timeout: float,
        max_pending: int = 1024,
        max_pending_bytes: int = 4 << 20,
        retries: int = 0,
        retry_backoff: float = 0.2,
        rng: random.Random = _RNG,
        failover: Failover | None = None,
    ) -> None:
        self._opener = opener
        self._failover = failover
        self._first_token_timeout = first_token_timeout
        self._idle_timeout = idle_timeout
        #: Most chunks, and most bytes of their lines, held for the caller.
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._rng = rng
        self._retries = retries
        self._retry_backoff = retry_backoff
        #: Upstream attempts made (1 + retries used).
        self.attempts = 0
        self._loop = asyncio.get_running_loop()
        self._pending: list[Event] = []
        self._sizes: list[int] = []  # line bytes of each pending chunk
        #: Line bytes of the chunks pending now; of each chunk ``take`` returned last.
        self.pending_bytes = 0
        self.taken_sizes: list[int] = []
        self._wakeup: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None  # the pull path waits here
        self._full = False  # pending is at its bound: reading is paused
        self._resume: Callable[[], None] | None = None  # the push path's un-pause
        self._finished = False
        self._complete = False  # the final (done) chunk arrived
        #: The final chunk's figures, once it arrived.
        self.final: Final | None = None
        self._error: BaseException | None = None
        self._expired: type[UpstreamError] | None = None
        self._timeout: asyncio.Timeout | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._attempt: asyncio.Timeout | None = None  # an attempt's own first-chunk limit
        self._closing = False  # the reader is being stopped: no further attempt
        self._started_at = self._loop.time()
        #: Loop times of the first and the latest chunk, and how many arrived.
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.count = 0
        #: perf_counter() of the first and latest chunk, for the speed figures.
        self.first_perf = self.last_perf = 0.0
        self._task = self._loop.create_task(self._run())

    # -- writer side ------------------------------------------------------------

    async def take(self, max_items: int = 0, wait: float | None = None) -> list[Event] | None:
        """Returns the chunks that arrived since the last call (at most
        ``max_items`` if > 0), waiting for at least one. Returns [] after the
        stream ended cleanly, None when ``wait`` seconds passed with nothing
        new; raises the stream's error once everything before it was taken."""
        while not self._pending:
            if self._finished:
                if self._error is not None:
                    raise self._error
                return []
            self._wakeup = self._loop.create_future()
            try:
                if wait is None:
                    await self._wakeup
                else:
                    await asyncio.wait([self._wakeup], timeout=wait)
                    if not self._wakeup.done():
                        return None
            finally:
                self._wakeup = None
        if 0 < max_items < len(self._pending):
            batch = self._pending[:max_items]
            del self._pending[:max_items]
            self.taken_sizes = self._sizes[:max_items]
            del self._sizes[:max_items]
            self.pending_bytes -= sum(self.taken_sizes)
        else:
            batch, self._pending = self._pending, []
            self.taken_sizes, self._sizes = self._sizes, []
            self.pending_bytes = 0
        if self._full and (len(self._pending) < self.max_pending
                           and self.pending_bytes < self.max_pending_bytes):
            self._full = False
            if self._resume is not None:
                self._resume()
            if self._space is not None and not self._space.done():
                self._space.set_result(None)
        return batch

    def interrupt(self, error: BaseException) -> None:
        """Ends the stream with ``error`` (after what is pending is taken)."""
        if not self._finished:
            self._error = error
            self._cancel_reader()

    async def aclose(self) -> None:
        """Stops the reader (closing the upstream response) and waits for it.

        A reader that already has the final chunk is left to finish on its own:
        cancelling it while httpx closes the response (which awaits a lock)
        leaves the pool connection marked active for ever."""
        if not self._task.done() and not self._complete:
            self._cancel_reader()
        await asyncio.wait([self._task])

    def _cancel_reader(self) -> None:
        """Cancels the reader exactly once: a second cancellation (say, the
        first-token timer firing as the caller's deadline passes) would land in
        the response's clean-up and leave its pool connection marked busy."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(None)
        if self._attempt is not None and not self._attempt.expired():
            self._attempt.reschedule(None)
        if not self._task.cancelling():
            self._task.cancel()

    # -- reader side ------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _check_timer(self) -> None:
        """Fires the timeout when the current phase's limit has passed."""
        now = self._loop.time()
        kind: type[UpstreamError]
        if self.last_at is None:
            limit, since, kind = self._first_token_timeout, self._started_at, FirstTokenTimeout
        else:
            limit, since, kind = self._idle_timeout, self.last_at, IdleTimeout
        if self._full:  # paused by a slow caller: not the upstream's fault
            since = now
        due = since + limit
        if now >= due and self._timeout is not None:
            self._expired = kind
            self._timeout.reschedule(now)
        else:
            self._timer = self._loop.call_at(due, self._check_timer)

    async def _read_with_retries(self) -> None:
        """Reads the stream; before the first chunk, a failure the failover takes moves
        the call to another upstream at once, and an outage is retried with
        exponential backoff (the first-token timer keeps running, so neither ever
        outlasts it or the caller's deadline)."""
        retried = 0
        while True:
            self.attempts += 1
            try:
                await self._read()
                return
            except UpstreamError as exc:
                if self.count or self._closing:
                    raise
                if self._failover is not None and self._failover.failed(exc):
                    continue  # the failover logs which upstream failed
                if retried >= self._retries or not exc.retryable:
                    raise
                retried += 1
                delay = retry_delay(retried, self._retry_backoff, self._rng)
                if exc.retry_after is not None:  # the engine named its wait: not sooner
                    delay = max(delay, exc.retry_after)
                if self._loop.time() + delay >= self._started_at + self._first_token_timeout:
                    raise
                log.info("upstream attempt %d failed before the first token (%s); retrying in "
                         "%.2fs", self.attempts, reason_of(exc), delay)
                await asyncio.sleep(delay)

    def _push(self, event: Event, size: int) -> bool:
        """Takes one chunk (its line was ``size`` bytes) from the upstream; True when
        pending is full."""
        now = self._loop.time()
        if self.first_at is None:
            self.first_at = now
            if self._attempt is not None and not self._attempt.expired():
                self._attempt.reschedule(None)  # it answered: no failover any more
            # From now on the idle limit applies: re-arm once.
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(now + self._idle_timeout, self._check_timer)
        self.last_at = now
        self.last_perf = time.perf_counter()
        if not self.count:
            self.first_perf = self.last_perf
        self.count += 1
        if event[3] is not None:
            self._complete = True
            self.final = event[3]
        self._pending.append(event)
        self._sizes.append(size)
        self.pending_bytes += size
        self._wake()
        if len(self._pending) >= self.max_pending or (
                self.pending_bytes >= self.max_pending_bytes):
            self._full = True
        return self._full

    async def _read(self) -> None:
        opened = self._opener()
        limit = self._failover.attempt_limit() if self._failover is not None else None
        if limit is None:
            await self._consume(opened)
            return
        assert self._failover is not None
        try:
            async with asyncio.timeout(limit) as attempt:
                self._attempt = attempt
                try:
                    await self._consume(opened)
                finally:
                    self._attempt = None
        except TimeoutError:
            if self.count or not attempt.expired():
                raise  # not this attempt's limit (see _cancel_reader)
            raise self._failover.expired(limit) from None

    async def _consume(self, opened: AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]
                       ) -> None:
        async with opened as chunks:
            if isinstance(chunks, Response):  # push: chunks arrive in the socket callback
                self._resume = chunks.resume
                try:
                    await chunks.deliver(self._push)
                finally:
                    self._resume = None
                return
            async for event, size in chunks:
                if self._push(event, size):
                    self._space = self._loop.create_future()
                    try:
                        await self._space
                    finally:
                        self._space = None

    async def _run(self) -> None:
        try:
            async with asyncio.timeout(None) as timeout:
                self._timeout = timeout
                self._timer = self._loop.call_at(
                    self._started_at + self._first_token_timeout, self._check_timer
                )
                await self._read_with_retries()
        except TimeoutError:
            if self._expired is FirstTokenTimeout:
                self._error = FirstTokenTimeout(
                    f"no output from Ollama within {self._first_token_timeout:g}s "
                    "(the model may still be loading); retry, give the call a longer "
                    "deadline, or raise --first-token-timeout"
                )
            elif self._expired is IdleTimeout:
                self._error = IdleTimeout(
                    f"Ollama stopped sending output for {self._idle_timeout:g}s "
                    f"after {self.count} chunk(s); raise --idle-timeout if the model is slow"
                )
            else:
                self._error = UpstreamError("upstream read timed out")
        except Exception as exc:  # anything else still ends the stream with an error
            if self._error is None:
                self._error = exc
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._finished = True
            self._wake()
