"""The resumable streams of one server: by id and owner, with their timers and bounds.

A stream's life:

    started ──(readers come and go)──> finished ──(retention)──> gone
       │ nobody reads for the detach grace, or Cancel              ^
       └──> cancelled upstream (finished, with STREAM_CANCELLED) ──┘

While it generates it holds its admission slot (given back when the engine is done,
whoever is reading). Finished streams are kept for ``retention`` seconds, or until
their bytes are needed for a new stream (oldest finished first). An id that is gone
leaves a tombstone for a while, so that its owner learns *why* it is not found; to
anyone else every unknown id looks the same.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenwire.v1 import generation_pb2 as pb

from .._relay import Opener
from ..backends._base import Final
from ..backends._choice import Call
from ._errors import RetentionFull, StreamCancelled, StreamNotFound
from ._log import Budget, StreamLog

if TYPE_CHECKING:  # redis-py is imported only when --redis-url is set
    from ._redis import RedisStreams

__all__ = ["ResumableStream", "Retention", "Streams"]

log = logging.getLogger("tokenwire.service")

#: URL-safe base64 of 18 random bytes: 144 bits.
_ID_BYTES = 18


def new_stream_id() -> str:
    """A new stream id: 18 random bytes in URL-safe base64, never starting with ``-``,
    which a command line would read as an option (``tokenwire resume ID``): 1 id in 64
    is drawn again, so the first character has 63 values (143.98 bits in all)."""
    while True:
        stream_id = secrets.token_urlsafe(_ID_BYTES)
        if not stream_id.startswith("-"):
            return stream_id
#: Ids of streams that are gone, remembered to say why (FIFO).
_TOMBSTONES = 10_000


@dataclass(frozen=True)
class Retention:
    """The bounds (flags ``--detach-grace``, ``--resume-retention``,
    ``--resume-max-stream-bytes``, ``--resume-max-bytes``)."""

    detach_grace: float = 60.0
    retention: float = 600.0
    max_stream_bytes: int = 8 << 20
    max_bytes: int = 512 << 20


@dataclass(eq=False)
class ResumableStream:
    id: str
    owner: str
    model: str
    grace: float
    #: perf_counter() when the request arrived (the gateway's figures count from it).
    started: float
    call: Call | None
    log: StreamLog = field(init=False)
    #: Readers streaming it now.
    readers: int = 0
    #: The final Token's fields (done, finish reason, usage, model), built once.
    figures: pb.Token | None = None
    #: Gives the admission slot back (once the engine is done).
    release: Callable[[], None] | None = None
    timer: asyncio.TimerHandle | None = None
    #: The final Token's fields for the stream's final event (built once; the servicer
    #: sets it).
    figures_of: Callable[[Final], pb.Token] = field(default=lambda final: pb.Token())
    #: The W3C traceparent of its generation's span ("" when tracing is off): the spans
    #: of the calls that read it link there.
    trace: str = ""

    def stop(self, error: BaseException) -> bool:
        """Ends generation with ``error`` unless it already ended; True if it did."""
        if self.log.finished:
            return False
        self.log.interrupt(error)
        return True


class Streams:
    def __init__(self, retention: Retention | None = None,
                 redis: RedisStreams | None = None) -> None:
        self.retention = retention or Retention()
        #: The shared store other replicas read (``--redis-url``), if any.
        self.redis = redis
        if redis is not None:
            redis.on_cancel = self._cancel_by_id
        self._checks: set[asyncio.Task[None]] = set()
        #: Told (live, kept, bytes held) whenever a stream starts, ends or goes.
        self.on_change: Callable[[int, int, int], None] = lambda live, kept, held: None
        self._streams: dict[str, ResumableStream] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id: (owner, why)
        self.budget = Budget(self.retention.max_bytes, self._make_room)

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def live(self) -> int:
        """Streams still generating."""
        return len(self._streams) - len(self._finished)

    # -- start ------------------------------------------------------------------

    def open(self, opener: Opener, *, owner: str, model: str, grace: float | None,
             started: float, call: Call | None, **relay: object) -> ResumableStream:
        """Starts a resumable stream reading ``opener``. Raises RetentionFull when the
        buffers cannot take one more stream of the per-stream bound."""
        bounds = self.retention
        while (self.budget.held + bounds.max_stream_bytes > bounds.max_bytes
               and self._drop_oldest_finished()):
            pass
        if self.budget.held + bounds.max_stream_bytes > bounds.max_bytes:
            raise RetentionFull(
                f"no room for another resumable stream: the {len(self._streams)} kept hold "
                f"{self.budget.held} of {bounds.max_bytes} bytes (--resume-max-bytes) and a "
                f"stream may need {bounds.max_stream_bytes} (--resume-max-stream-bytes); "
                "retry later, or without resumable")
        wanted = bounds.detach_grace if not grace or grace <= 0 else grace
        stream = ResumableStream(new_stream_id(), owner, model,
                                 min(wanted, bounds.detach_grace), started, call)
        stream.log = StreamLog(opener, max_bytes=bounds.max_stream_bytes, budget=self.budget,
                               on_done=lambda _: self._done(stream), **relay)
        self._streams[stream.id] = stream
        self._changed()
        return stream

    def _changed(self) -> None:
        self.on_change(self.live, len(self._finished), self.budget.held)

    # -- readers ----------------------------------------------------------------

    def local(self, stream_id: str, owner: str) -> ResumableStream | None:
        """The caller's stream when this process holds it."""
        stream = self._streams.get(stream_id)
        return stream if stream is not None and stream.owner == owner else None

    def get(self, stream_id: str, owner: str) -> ResumableStream:
        """The caller's stream, or StreamNotFound saying why when the caller may know."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.owner == owner:
            return stream
        gone = self._gone.get(stream_id)
        if gone is not None and gone[0] == owner:
            raise StreamNotFound(f"the stream has ended and is no longer kept: {gone[1]}; "
                                 "start the request again")
        raise StreamNotFound("no resumable stream of yours has this id: it was never "
                             "started on this server (ids come from Start, or from the "
                             "first Token of a resumable Generate or Chat)")

    def attach(self, stream: ResumableStream) -> None:
        stream.readers += 1
        if stream.timer is not None and not stream.log.finished:
            stream.timer.cancel()  # the grace timer: somebody reads again
            stream.timer = None

    def detach(self, stream: ResumableStream) -> None:
        stream.readers -= 1
        if stream.readers == 0 and not stream.log.finished and stream.timer is None:
            loop = asyncio.get_running_loop()
            stream.timer = loop.call_later(stream.grace, self._abandoned, stream)

    def unread(self, stream: ResumableStream) -> None:
        """Starts the detach grace of a stream nobody has read yet (Start)."""
        stream.readers += 1
        self.detach(stream)

    def cancel(self, stream: ResumableStream) -> bool:
        return stream.stop(StreamCancelled("the stream was stopped by a Cancel call"))

    def stop_all(self, error: BaseException) -> None:
        """Ends every stream still generating (shutdown after its grace)."""
        for stream in list(self._streams.values()):
            stream.stop(error)

    # -- timers and bounds ------------------------------------------------------

    def _cancel_by_id(self, stream_id: str) -> None:
        """Cancel from another replica (through Redis)."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            self.cancel(stream)

    def _abandoned(self, stream: ResumableStream) -> None:
        stream.timer = None
        if stream.readers == 0 and self.redis is not None:
            # Another replica may be serving a Resume of it: ask Redis first.
            task = asyncio.get_running_loop().create_task(self._check_remote(stream))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
            return
        self._give_up(stream)

    async def _check_remote(self, stream: ResumableStream) -> None:
        assert self.redis is not None
        if await self.redis.is_read(stream.id) and not stream.log.finished:
            if stream.readers == 0 and stream.timer is None:
                stream.timer = asyncio.get_running_loop().call_later(
                    1.0, self._abandoned, stream)  # look again while it is being read
            return
        self._give_up(stream)

    def _give_up(self, stream: ResumableStream) -> None:
        if stream.readers == 0:
            stream.stop(StreamCancelled(
                f"nobody read the stream for its detach grace ({stream.grace:g}s), so it was "
                "cancelled; resume sooner, or ask for a longer resumable.detach_grace (at "
                "most the server's --detach-grace)"))

    def _done(self, stream: ResumableStream) -> None:
        """The engine is done with ``stream`` (finished, failed or stopped)."""
        if stream.timer is not None:
            stream.timer.cancel()
        if stream.release is not None:
            stream.release()
            stream.release = None
        if stream.id not in self._streams:  # dropped already (shutdown)
            return
        self._finished[stream.id] = None
        self._changed()
        loop = asyncio.get_running_loop()
        stream.timer = loop.call_later(self.retention.retention, self._expire, stream,
                                       f"it ended more than {self.retention.retention:g}s ago "
                                       "(--resume-retention)")

    def _expire(self, stream: ResumableStream, why: str) -> None:
        if self._streams.get(stream.id) is not stream:
            return
        del self._streams[stream.id]
        self._finished.pop(stream.id, None)
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        stream.log.release()
        self._gone[stream.id] = (stream.owner, why)
        while len(self._gone) > _TOMBSTONES:
            self._gone.popitem(last=False)
        self._changed()

    def _drop_oldest_finished(self) -> bool:
        if not self._finished:
            return False
        oldest = next(iter(self._finished))
        self._expire(self._streams[oldest], "it was dropped to make room for newer streams "
                                            "(--resume-max-bytes)")
        return True

    def _make_room(self) -> bool:
        """Called when a chunk takes the buffers past their bound: drops finished streams
        until they fit; False when only generating ones are left."""
        while self.budget.held > self.budget.limit:
            if not self._drop_oldest_finished():
                return False
        return True

