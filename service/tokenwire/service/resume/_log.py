"""StreamLog: a Relay that keeps every chunk; Cursors read it from any index.

A plain stream's relay hands each chunk to its one writer and forgets it, and stops
reading the upstream when the writer falls behind (TCP flow control holds the model
back). A resumable stream has no single writer: the caller may be gone, and whoever
resumes may start from any chunk. So the log keeps every event and never pauses the
upstream; its bound is in bytes (the frames' sizes, a fair measure of what the
events hold), per stream and over all streams (``Budget``). A reader over the bound
ends the stream with RESOURCE_EXHAUSTED rather than drop anything silently.

Chunks still arrive in the socket callback (push path) and wake the readers waiting
there, one future each; a reader that keeps up gets one chunk per message, as on a
plain stream.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from .._relay import Opener, Relay
from ..backends._base import Event
from ._errors import StreamTooLarge

__all__ = ["Budget", "Cursor", "StreamLog"]


class Budget:
    """Bytes held by every stream's log together, and the bound on them. ``overflow``
    is called when a chunk takes ``held`` past ``limit``: it frees finished streams,
    or says no (False) and the growing stream ends."""

    __slots__ = ("held", "limit", "overflow")

    def __init__(self, limit: int, overflow: Callable[[], bool] | None = None) -> None:
        self.held = 0
        self.limit = limit
        self.overflow: Callable[[], bool] = overflow or (lambda: False)


class StreamLog(Relay):
    def __init__(self, opener: Opener, *, max_bytes: int, budget: Budget,
                 on_done: Callable[[StreamLog], None], **relay: Any) -> None:
        #: Most bytes this stream may hold.
        self.max_bytes = max_bytes
        self._budget = budget
        self._on_done = on_done
        self._waiters: list[asyncio.Future[None]] = []
        self._overflowed = False
        # The relay's pending list is the log: it is never taken from, so never full.
        super().__init__(opener, max_pending=sys.maxsize, max_pending_bytes=sys.maxsize,
                         **relay)

    @property
    def events(self) -> list[Event]:
        return self._pending

    @property
    def sizes(self) -> list[int]:
        return self._sizes

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def error(self) -> BaseException | None:
        return self._error

    def release(self) -> None:
        """Gives back the bytes this log holds (it is being dropped)."""
        self._budget.held -= self.pending_bytes
        self.pending_bytes = 0

    def wait(self) -> asyncio.Future[None]:
        """A future set when the next chunk arrives or the stream ends."""
        future = self._loop.create_future()
        self._waiters.append(future)
        return future

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _push(self, event: Event, size: int) -> bool:
        if self._overflowed:  # ended: what arrives until the reader stops is not kept
            return False
        super()._push(event, size)
        budget = self._budget
        budget.held += size
        if self.pending_bytes > self.max_bytes:
            self._overflow(StreamTooLarge(
                f"the answer is over the {self.max_bytes} bytes a resumable stream may hold "
                "(--resume-max-stream-bytes); ask for fewer tokens (options.max_tokens), or "
                "do not make the stream resumable"))
        elif budget.held > budget.limit and not budget.overflow():
            self._overflow(StreamTooLarge(
                f"the server's buffers for resumable streams are full (--resume-max-bytes "
                f"{budget.limit}); the stream was ended to keep them bounded: retry later, "
                "or without resumable"))
        return False

    def _overflow(self, error: StreamTooLarge) -> None:
        self._overflowed = True
        self.interrupt(error)

    async def _run(self) -> None:
        try:
            await super()._run()
        finally:
            self._on_done(self)


class Cursor:
    """One reader of a StreamLog, from chunk ``position`` on. It has the writer side of
    a Relay (``take``, ``taken_sizes``, the bounds), so the delivery modes group its
    chunks as they group a plain stream's."""

    __slots__ = ("_log", "max_pending", "max_pending_bytes", "position", "taken_sizes")

    def __init__(self, log: StreamLog, position: int, *, max_items: int,
                 max_bytes: int) -> None:
        self._log = log
        #: Index of the next chunk to take.
        self.position = position
        #: Most chunks and bytes one take returns (what a plain relay holds at most).
        self.max_pending = max_items
        self.max_pending_bytes = max_bytes
        self.taken_sizes: list[int] = []

    async def take(self, max_items: int = 0, wait: float | None = None) -> list[Event] | None:
        """As ``Relay.take``: the chunks from ``position`` on (at least one, waiting for
        it), [] once the stream ended cleanly, None after ``wait`` seconds with nothing
        new; the stream's error once every chunk before it was taken."""
        log = self._log
        events = log.events
        start = self.position
        while start >= len(events):
            if log.finished:
                if log.error is not None:
                    raise log.error
                return []
            future = log.wait()
            if wait is None:
                await future
            else:
                await asyncio.wait([future], timeout=wait)
                if not future.done():
                    future.cancel()
                    return None
        end = len(events)
        limit = self.max_pending if max_items <= 0 else min(max_items, self.max_pending)
        if end - start > limit:
            end = start + limit
        if end - start > 1:  # a replay or a caller behind: bound the bytes too
            held = 0
            sizes = log.sizes
            for i in range(start, end):
                held += sizes[i]
                if held >= self.max_pending_bytes:
                    end = i + 1
                    break
        self.position = end
        self.taken_sizes = log.sizes[start:end]
        return events[start:end]
