"""Resumable streams across replicas, on Redis (``--redis-url``).

The replica that generates a stream keeps it in memory as always (its own readers are
served from there) and mirrors it to Redis, so that any replica can serve Resume:

    tw:{id}:m   hash: owner, model, state (live | ended), the replica generating it, and
                its generation's traceparent when that replica traces
    tw:{id}:s   Redis Stream; each entry is a batch of chunks:
                  p = index of its first chunk, e = the chunks (JSON: text, thinking,
                  tool calls as base64 ToolCall bytes), and on the last entry either
                  f = the final Token's fields (done, finish reason, usage, model: the
                  bytes of a Token) or x = the error status (code, message, details)
    tw:{id}:a   "alive": set by the generating replica every second while it generates
    tw:{id}:r   "read": set by a replica that serves a Resume of it, every second, so
                that the generating replica does not cut it off after its detach grace
    tw:{id}:g   "gone": its owner, outliving the rest, so an expired id says so (to its
                owner only)
    tw:cancel   pub/sub channel: Cancel on any replica reaches the generating one

Writes are one pipelined round trip per batch, at most one per 50 ms per stream: what
arrives meanwhile goes in the next, so a fast model costs one write per many chunks, never
one per chunk (a reader on another replica sees a chunk up to 50 ms later than a local
one). The TTLs and the "alive" key are refreshed with the heartbeat, not with every batch.
Every key has a TTL: the retention for what the stream wrote (refreshed while it grows), a
few heartbeats for "alive" and "read". A reader tells chunks apart by their positions, so
an entry written twice (after Redis came back without its data, the mirror writes the
stream again from its start) is never delivered twice.

Redis unreachable: resumable starts are refused (UNAVAILABLE, naming Redis), streams in
flight go on for the readers they have and are written to Redis again once it is back;
health (``resumable``) and the metric ``tokenwire_redis_up`` say so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tokenwire.v1 import generation_pb2 as pb

from .._exceptions import TruncatedStream
from ..backends._base import Event, Final
from ._errors import PositionOutOfRange, ReplayedStatus, StoreUnavailable, StreamNotFound
from ._log import StreamLog

__all__ = ["RedisStreams", "RemoteCursor", "RemoteStream"]

log = logging.getLogger("tokenwire.service")

#: Seconds between heartbeats (alive, read); keys of live streams outlive 4 of them.
HEARTBEAT = 1.0
_LIVE_TTL_MS = int(HEARTBEAT * 4000)
#: Seconds between two writes of one stream at most (their chunks are batched meanwhile).
_FLUSH = 0.05
_CANCEL = "tw:cancel"


def _keys(stream_id: str) -> tuple[str, str, str, str, str]:
    base = f"tw:{stream_id}:"
    return base + "m", base + "s", base + "a", base + "r", base + "g"


def _encode(events: list[Event]) -> bytes:
    return orjson.dumps([
        (text, thinking, [base64.b64encode(c.SerializeToString()).decode() for c in calls]
         if calls else None) for text, thinking, calls, _ in events])


def _decode(raw: bytes) -> list[tuple[str, str, list[pb.ToolCall] | None]]:
    out = []
    for text, thinking, calls in orjson.loads(raw):
        out.append((text, thinking, [pb.ToolCall.FromString(base64.b64decode(c))
                                     for c in calls] if calls else None))
    return out


def _status_fields(status: grpc.Status) -> bytes:
    details = b""
    for key, value in status.trailing_metadata or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            details = value
    return orjson.dumps({"code": status.code.name, "message": status.details,
                         "details": base64.b64encode(details).decode()})


def _status_of(raw: bytes) -> ReplayedStatus:
    data = orjson.loads(raw)
    details = base64.b64decode(data["details"])
    return ReplayedStatus(getattr(grpc.StatusCode, data["code"]), data["message"],
                          (("grpc-status-details-bin", details),) if details else ())


def _ready(log_: StreamLog) -> int:
    """Chunks that may be written now: all but a final one, which goes with the end."""
    events = log_.events
    return len(events) - 1 if events and events[-1][3] is not None else len(events)


def _ending(log_: StreamLog, figures: Callable[[Final], pb.Token],
            status: Callable[[Exception], grpc.Status]) -> dict[str, bytes]:
    """The fields of a stream's last entry: its final figures, or its error status."""
    events = log_.events
    final = events[-1][3] if events else None
    error = log_.error
    if final is not None and final.error is not None:
        error = final.error
    if error is None and final is None:
        error = TruncatedStream("the engine's stream ended without a final message")
    if error is not None:
        return {"x": _status_fields(status(error))}  # type: ignore[arg-type]  # BaseException
    assert final is not None
    return {"f": figures(final).SerializeToString()}


@dataclass
class RemoteStream:
    """A stream generated by another replica, as its meta hash describes it."""

    id: str
    model: str
    live: bool
    #: The traceparent of its generation's span ("" when not traced).
    trace: str = ""


class RedisStreams:
    """The Redis side of resumable streams for one replica."""

    def __init__(self, url: str, *, retention: float, max_entries: int,
                 connect_timeout: float = 2.0) -> None:
        self.url = url
        self._retention_ms = int(retention * 1000)
        self._max_entries = max_entries
        # redis-py's types allow every reply shape of every protocol version; this client
        # decodes nothing (bytes replies), which its types cannot say.
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=connect_timeout,
            health_check_interval=0)
        #: Whether the last exchange with Redis worked.
        self.up = False
        self.replica = os.urandom(6).hex()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self.on_state: Callable[[bool], None] = lambda up: None
        self.on_cancel: Callable[[str], None] = lambda stream_id: None

    @property
    def where(self) -> str:
        """The URL without a password, for messages."""
        from .._config import redact_url
        return redact_url(self.url)

    # -- life -------------------------------------------------------------------

    async def start(self) -> None:
        await self._probe()
        self._watch = asyncio.create_task(self._watching())
        self._listener = asyncio.create_task(self._listening())

    async def aclose(self) -> None:
        for task in (self._watch, self._listener, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._watch, self._listener, *self._tasks)
                               if t is not None), return_exceptions=True)
        await self._redis.aclose()

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            if up:
                log.info("redis at %s is reachable again", self.where)
            else:
                log.warning("redis at %s is not reachable: resumable starts are refused "
                            "until it is back", self.where)
            self.up = up
            self.on_state(up)

    async def _probe(self) -> None:
        try:
            await self._redis.ping()
            self._set_up(True)
        except (RedisError, OSError):
            self._set_up(False)

    async def _watching(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self._probe()

    async def _listening(self) -> None:
        """Cancels this replica's streams named on the cancel channel (from any replica)."""
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(_CANCEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.on_cancel(message["data"].decode())
            except (RedisError, OSError):
                await asyncio.sleep(HEARTBEAT)

    def require(self) -> None:
        """Raises StoreUnavailable while Redis is down (a start would not be resumable
        anywhere else)."""
        if not self.up:
            raise StoreUnavailable(
                f"resumable streams are kept in Redis at {self.where}, which is not reachable "
                "now; retry later, or start the stream without resumable")

    # -- the generating replica ---------------------------------------------------

    def mirror(self, stream_id: str, owner: str, model: str, log_: StreamLog,
               figures: Callable[[Final], pb.Token],
               status: Callable[[Exception], grpc.Status], trace: str = "") -> None:
        """Writes ``log_`` to Redis as it grows, until it ends (a task of its own).
        ``trace``: the traceparent of its generation's span, if traced."""
        meta = {"owner": owner, "model": model, "state": "live", "replica": self.replica}
        if trace:
            meta["trace"] = trace
        task = asyncio.create_task(self._mirror(stream_id, meta, log_, figures, status))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(self, stream_id: str, described: dict[str, str], log_: StreamLog,
                      figures: Callable[[Final], pb.Token],
                      status: Callable[[Exception], grpc.Status]) -> None:
        meta, entries, alive, _, gone = _keys(stream_id)
        owner = described["owner"]
        written = 0  # chunks in Redis
        lost = True  # the meta hash is to be written: the first time, or after a failure
        failures = 0
        loop = asyncio.get_running_loop()
        beat = -HEARTBEAT  # when the keys' TTLs and "alive" were last refreshed
        last = -_FLUSH  # when the last write began
        while True:
            if not log_.finished and written >= _ready(log_) and not lost:
                # Nothing new: wait for chunks, or write the heartbeat alone.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(log_.wait(),
                                           max(beat + HEARTBEAT - loop.time(), 0.001))
            if not log_.finished and not lost:
                # Let a batch build up: one write per _FLUSH at most while it generates
                # (readers on other replicas see chunks up to that much later).
                pause = last + _FLUSH - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
            last = loop.time()
            ended = log_.finished  # first: once it is set, the events are complete
            try:
                if lost and written and not await self._redis.exists(meta):
                    written = 0  # Redis came back without it: write it all again
                events = log_.events
                upto = len(events) if ended else _ready(log_)
                batch = events[written:upto]
                pipe = self._redis.pipeline(transaction=False)
                if lost:
                    pipe.hset(meta, mapping=described)
                fields: dict[str, Any] = {"p": written, "e": _encode(batch)}
                if ended:
                    fields.update(_ending(log_, figures, status))
                if batch or ended:
                    pipe.xadd(entries, fields, maxlen=self._max_entries, approximate=True)
                # What a live stream wrote outlives its replica (the retention), so that
                # a reader learns the replica went away, and can keep what it produced.
                ttl = self._retention_ms
                now = loop.time()
                if ended:
                    pipe.hset(meta, "state", "ended")
                    pipe.set(gone, owner, px=self._retention_ms * 6)
                    pipe.delete(alive)
                elif lost or now >= beat + HEARTBEAT:  # the heartbeat: not every batch
                    pipe.set(alive, self.replica, px=_LIVE_TTL_MS)
                if ended or lost or now >= beat + HEARTBEAT:
                    pipe.pexpire(meta, ttl)
                    pipe.pexpire(entries, ttl)
                    beat = now
                await pipe.execute()
            except (RedisError, OSError):
                self._set_up(False)
                failures += 1
                lost = True
                if ended and failures * 5.0 > self._retention_ms / 1000:
                    return  # ended long ago and never written: nobody could resume it now
                await asyncio.sleep(min(HEARTBEAT * failures, 5.0))
                continue
            written += len(batch)
            lost = False
            failures = 0
            self._set_up(True)
            if ended:
                return

    async def is_read(self, stream_id: str) -> bool:
        """Whether a replica is serving a Resume of ``stream_id`` now."""
        try:
            return bool(await self._redis.exists(_keys(stream_id)[3]))
        except (RedisError, OSError):
            return False

    # -- any replica ----------------------------------------------------------------

    async def find(self, stream_id: str, owner: str) -> RemoteStream:
        """The stream as Redis has it; StreamNotFound unless it is ``owner``'s."""
        meta, _, _, _, gone = _keys(stream_id)
        try:
            found = await self._redis.hgetall(meta)
            # Only the owner learns that the id existed.
            expired = not found and await self._redis.get(gone) == owner.encode()
        except (RedisError, OSError) as exc:
            self._set_up(False)
            raise StoreUnavailable(f"Redis at {self.where} is not reachable, so the stream "
                                   "cannot be found; retry") from exc
        if found and found.get(b"owner", b"").decode() == owner:
            return RemoteStream(stream_id, found.get(b"model", b"").decode(),
                                found.get(b"state") == b"live",
                                found.get(b"trace", b"").decode())
        if expired and not found:
            raise StreamNotFound("no resumable stream of yours has this id now: it never "
                                 "existed, or it ended and its retention "
                                 "(--resume-retention) passed; start the request again")
        raise StreamNotFound("no resumable stream of yours has this id: it was never "
                             "started (ids come from Start, or from the first Token of a "
                             "resumable Generate or Chat)")

    async def cancel(self, stream: RemoteStream) -> bool:
        """Asks the generating replica to stop ``stream``; True when it was live and has
        ended within 2 s."""
        if not stream.live:
            return False
        meta = _keys(stream.id)[0]
        await self._redis.publish(_CANCEL, stream.id)
        for _ in range(200):
            if await self._redis.hget(meta, "state") != b"live":
                return True
            await asyncio.sleep(0.01)
        return True

    def cursor(self, stream: RemoteStream, after: int, *, max_items: int,
               max_bytes: int) -> RemoteCursor:
        return RemoteCursor(self._redis, stream, after, max_items=max_items,
                            max_bytes=max_bytes, where=self.where)


class RemoteCursor:
    """A Resume on this replica of a stream another replica generates (or generated):
    the chunks from ``position`` on, from Redis, then live as entries arrive. Same writer
    side as a Relay (``take``), so the delivery modes and the servicer treat it as any
    other source. While it reads, it tells the generating replica so (``tw:{id}:r``)."""

    def __init__(self, client: Any, stream: RemoteStream, position: int, *,
                 max_items: int, max_bytes: int, where: str) -> None:
        self._redis = client
        self._stream = stream
        self._keys = _keys(stream.id)
        self.position = position
        self.max_pending = max_items
        self.max_pending_bytes = max_bytes
        self.taken_sizes: list[int] = []
        self._where = where
        self._last_id = "0-0"
        #: Index of the next chunk this reader has not had; chunks the stream has produced.
        self._next = position
        self._produced = 0
        self._pending: list[Event] = []
        self._sizes: list[int] = []
        self._end: BaseException | None = None
        self._ended = False
        self.figures: pb.Token | None = None
        self._beat = 0.0

    async def take(self, max_items: int = 0, wait: float | None = None) -> list[Event] | None:
        while not self._pending:
            if self._ended:
                if self._end is not None:
                    raise self._end
                return []
            got = await self._fetch(wait)
            if not got and wait is not None:
                return None
        limit = self.max_pending if max_items <= 0 else min(max_items, self.max_pending)
        n = min(limit, len(self._pending))
        held = 0
        for i in range(n):
            held += self._sizes[i]
            if held >= self.max_pending_bytes:
                n = i + 1
                break
        batch, self._pending = self._pending[:n], self._pending[n:]
        self.taken_sizes, self._sizes = self._sizes[:n], self._sizes[n:]
        return batch

    async def prelude(self) -> pb.Token | None:
        """Reads until there is a chunk to send or the stream's end. When the caller has
        every chunk already, the final Token again (no text, no chunks) to send alone."""
        while not self._pending and not self._ended:
            await self._fetch(None)
        if self._ended and not self._pending and self._end is None and self.figures:
            token = pb.Token(position=self._next)
            token.MergeFrom(self.figures)
            return token
        return None

    async def _fetch(self, wait: float | None) -> bool:
        """Reads the next entries (blocking up to a heartbeat); False when none came."""
        loop = asyncio.get_running_loop()
        meta, entries, alive, reading, _ = self._keys
        block = max(int(min(wait if wait is not None else HEARTBEAT, HEARTBEAT) * 1000), 1)
        try:
            if loop.time() >= self._beat + HEARTBEAT:
                self._beat = loop.time()
                await self._redis.set(reading, "1", px=_LIVE_TTL_MS)
            answer = await self._redis.xread({entries: self._last_id}, count=256, block=block)
            if not answer:
                state = await self._redis.hget(meta, "state")
                if state is None:
                    self._fail(StreamNotFound("the stream is no longer in Redis (its retention "
                                              "passed, or Redis lost it); start it again"))
                elif state == b"live" and not await self._redis.exists(alive):
                    self._fail(ReplayedStatus(
                        grpc.StatusCode.UNAVAILABLE,
                        "the replica generating this stream went away before it ended: "
                        "every chunk it produced until then was delivered; start the "
                        "request again for the rest", ()))
                return False
        except (RedisError, OSError) as exc:
            self._fail(StoreUnavailable(f"Redis at {self._where} stopped answering while this "
                                        f"stream was read ({type(exc).__name__}); resume again "
                                        "from the last position once it is back"))
            return False
        for _, items in answer:
            for entry_id, fields in items:
                self._last_id = entry_id.decode()
                self._add(fields)
        return True

    def _add(self, fields: dict[bytes, bytes]) -> None:
        first = int(fields[b"p"])
        chunks = _decode(fields[b"e"])
        final = None
        if b"f" in fields:
            self.figures = pb.Token.FromString(fields[b"f"])
            final = Final(self.figures.finish_reason, self.figures.usage, self.figures.model)
        if first > self._next:
            self._fail(ReplayedStatus(
                grpc.StatusCode.DATA_LOSS, f"chunks {self._next} to {first - 1} of this "
                "stream are missing from Redis (it lost data); start the request again", ()))
            return
        for i, (text, thinking, calls) in enumerate(chunks):
            if first + i < self._next:
                continue  # had it already (an entry written twice, or before `after`)
            self._next = first + i + 1
            self._pending.append((text, thinking, calls,
                                  final if i == len(chunks) - 1 else None))
            self._sizes.append(len(text) + len(thinking) + 64)
        self._produced = max(self._produced, first + len(chunks))
        if b"x" in fields:
            self._fail(_status_of(fields[b"x"]))
        elif final is not None:
            self._ended = True
            if self._produced < self._next:
                self._fail(PositionOutOfRange(
                    f"after is {self._next}, but the stream produced {self._produced} "
                    "chunk(s); pass the position plus the chunk_count of the last Token "
                    "received"))

    def _fail(self, error: BaseException) -> None:
        self._ended = True
        self._end = error
