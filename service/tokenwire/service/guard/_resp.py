"""A small pipelined Redis connection for the shared limits' hot path: one socket, the
commands of one event-loop turn written together, replies read by hiredis's parser.

Every model call admitted under ``--redis-url`` runs two Lua scripts (its admission,
and its end). Through redis-py's asyncio client each ran on a pooled connection with a
StreamReader, a pure-Python RESP packer and a retry wrapper, and a pipeline holding a
script checked ``SCRIPT EXISTS`` on every run: 3 round trips and about +870 µs of gateway
CPU per call in the bench (``limits`` phase), against +50 µs targeted. Here a call's
scripts are packed by hiredis (1-2 µs), written with the other commands of its loop
turn, and an end waits (``post``) for the next admission's write. Measured with
``bench/redis_link.py`` (the gate alone, no gRPC, uvloop, 2 shared cores at load 4),
CPU per call over the same limits kept in process: one call at a time +56 µs here
against +329 µs through redis-py; 100 at a time +17 against +87 µs. In the gateway under
the bench's load (100 calls of 4 tokens at a time), 0.96 writes per call, and the
``write`` system call is most of what is left: 32 µs each on this machine (loopback TCP
processes the receiving side and wakes redis-server inside the sender's call), then the
reply's read and parse (about 9 µs) and the packing and future (about 5 µs); see README,
Performance. redis-py stays for everything else (resumable streams) and lends its URL
parser, so ``redis://``, ``rediss://`` and ``unix://`` URLs mean the same in both.

Failure is all-or-nothing, as with redis-py: a refused or slow connect, a reply that
does not come within ``timeout`` of its write, or a dropped connection fails every
command waiting on the connection with Unreachable (the next command reconnects). An
error reply fails its own command (Unreachable too: the limits cannot be decided).
``EVALSHA`` of a script Redis does not hold (restarted, ``SCRIPT FLUSH``) loads it and
runs it again, in the same order with the commands after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

__all__ = ["Link", "Script", "Unreachable"]

_SETUP = b"(set-up)"  # marks AUTH and SELECT, written first on a new connection


class Unreachable(Exception):
    """Redis did not answer (in time), or could not carry out a command."""


class Script:
    """A Lua script, run by its SHA1 (``EVALSHA``) and loaded when Redis lacks it."""

    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()


class _Sent:
    """A command written and not yet answered: its future (None: nobody waits), for
    ``EVALSHA`` the script and the command, to run again after loading it, and what to
    do with a reply whose future was cancelled meanwhile."""

    __slots__ = ("future", "script", "command", "orphan")

    def __init__(self, future: asyncio.Future[Any] | None, script: Script | None = None,
                 command: bytes = b"", orphan: Callable[[Any], None] | None = None) -> None:
        self.future = future
        self.script = script
        self.command = command
        self.orphan = orphan


class _Protocol(asyncio.Protocol):
    def __init__(self, link: Link) -> None:
        self._link = link
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        answer = self._link._answer
        while (reply := reader.gets()) is not False:
            answer(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._link._lost(self, "connection closed" if exc is None else str(exc))


class Link:
    """One connection to Redis, opened when first needed and again after a failure."""

    def __init__(self, url: str, *, timeout: float = 0.5, post_delay: float = 0.01) -> None:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._timeout = timeout
        self._path: str | None = options.get("path")
        self._host: str = options.get("host", "localhost")
        self._port = int(options.get("port", 6379))
        self._ssl = _ssl_context(options) if options.get(
            "connection_class") is SSLConnection else None
        if self._ssl is None and options.get("connection_class") not in (
                None, UnixDomainSocketConnection):
            raise ValueError(f"unsupported Redis URL scheme in {url.split(':', 1)[0]}://")
        self._hello: list[bytes] = []  # written first on every new connection
        if options.get("password") is not None:
            user = options.get("username")
            self._hello.append(_pack(("AUTH", user, options["password"]) if user
                                     else ("AUTH", options["password"])))
        if int(options.get("db", 0)):
            self._hello.append(_pack(("SELECT", int(options["db"]))))
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queue: list[tuple[bytes, _Sent]] = []  # this turn's commands, not written
        self._flushing: asyncio.Handle | None = None
        self._soon = False  # _flushing is a call_soon, not post_delay's timer
        self._post_delay = post_delay
        self._sent: deque[_Sent] = deque()
        # (deadline, answered count at which every command of that write is answered)
        self._writes: deque[tuple[float, int]] = deque()
        self._written = 0
        self._answered = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: Called when commands nobody waits for (``post``) failed.
        self.on_dropped: Callable[[str], None] = lambda why: None

    # -- sending ----------------------------------------------------------------

    def send(self, command: bytes, script: Script | None = None,
             orphan: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
        """Queues a packed command for this loop turn's write; the future of its reply.
        ``orphan`` is given the reply if the future was cancelled before it came (the
        command ran all the same)."""
        if self._closed:
            raise Unreachable("the connection to Redis is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((command, _Sent(future, script, command, orphan)))
        if not self._soon:
            if self._flushing is not None:
                self._flushing.cancel()
            self._flushing = loop.call_soon(self._flush)
            self._soon = True
        return future

    def post(self, command: bytes, script: Script | None = None) -> None:
        """Queues a packed command whose reply is read and dropped (a failure goes to
        ``on_dropped``). It waits up to ``post_delay`` s for the write of a ``send``, and
        goes before that command: so a call's end usually shares the write and the read
        of a later admission instead of costing a system call of its own."""
        if self._closed:
            raise Unreachable("the connection to Redis is closed")
        self._queue.append((command, _Sent(None, script, command)))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_later(self._post_delay,
                                                                   self._flush)

    async def call(self, *args: Any) -> Any:
        return await self.send(_pack(args))

    def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Any],
                orphan: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
        return self.send(_pack(("EVALSHA", script.sha, len(keys), *keys, *args)), script,
                         orphan)

    def evalsha_post(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> None:
        self.post(_pack(("EVALSHA", script.sha, len(keys), *keys, *args)), script)

    def _flush(self) -> None:
        self._flushing = None
        self._soon = False
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            if self._connecting is None and self._queue:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return
        queue, self._queue = self._queue, []
        if not queue:
            return
        self._write(protocol, [command for command, _ in queue], [sent for _, sent in queue])

    def _write(self, protocol: _Protocol, commands: list[bytes], sent: list[_Sent]) -> None:
        assert protocol.transport is not None
        protocol.transport.write(b"".join(commands))
        self._sent.extend(sent)
        self._written += len(sent)
        loop = asyncio.get_running_loop()
        self._writes.append((loop.time() + self._timeout, self._written))
        if self._timer is None:
            self._timer = loop.call_at(self._writes[0][0], self._check_timeout)

    # -- connecting -------------------------------------------------------------

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(self), self._path)
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self), self._host, self._port, ssl=self._ssl,
                        server_hostname=self._host if self._ssl is not None else None)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._connecting = None
            queue, self._queue = self._queue, []
            self._fail([sent for _, sent in queue],
                       f"cannot connect to Redis: {exc or 'no answer in time'}")
            return
        self._connecting = None
        if self._closed or protocol.transport is None:  # closed meanwhile
            if protocol.transport is not None:
                protocol.transport.close()
            queue, self._queue = self._queue, []
            self._fail([sent for _, sent in queue], "the connection to Redis was closed")
            return
        self._protocol = protocol
        hello = [_Sent(None, command=_SETUP) for _ in self._hello]
        queue, self._queue = self._queue, []
        self._write(protocol, [*self._hello, *(c for c, _ in queue)],
                    [*hello, *(s for _, s in queue)])

    # -- replies and failures ---------------------------------------------------

    def _answer(self, protocol: _Protocol, reply: Any) -> None:
        sent = self._sent.popleft()
        self._answered += 1
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if sent.script is not None and message.startswith("NOSCRIPT"):
                # Load it and run the command again, after those already written: each
                # of those that ran the script finds it loaded too.
                self._write(protocol, [_pack(("SCRIPT", "LOAD", sent.script.body)),
                                       sent.command],
                            [_Sent(None), _Sent(sent.future, orphan=sent.orphan)])
                return
            if sent.command is _SETUP:  # AUTH or SELECT refused: nothing will work
                assert protocol.transport is not None
                protocol.transport.abort()
                self._lost(protocol, f"Redis refused the connection's set-up: {message}")
                return
            reply = Unreachable(f"Redis answered an error: {message}")
        future = sent.future
        if future is None:
            if isinstance(reply, Unreachable):
                self.on_dropped(str(reply))
        elif not future.done():
            if isinstance(reply, Unreachable):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        elif sent.orphan is not None and not isinstance(reply, Unreachable):
            sent.orphan(reply)

    def _check_timeout(self) -> None:
        self._timer = None
        writes = self._writes
        while writes and writes[0][1] <= self._answered:
            writes.popleft()
        if not writes:
            return
        loop = asyncio.get_running_loop()
        if writes[0][0] > loop.time():
            self._timer = loop.call_at(writes[0][0], self._check_timeout)
            return
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
        if protocol is not None:
            self._lost(protocol, f"Redis did not answer within {self._timeout:g} s")

    def _lost(self, protocol: _Protocol, why: str) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        sent, self._sent = list(self._sent), deque()
        self._writes.clear()
        self._written = self._answered = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(sent, why)

    def _fail(self, sent: list[_Sent], why: str) -> None:
        dropped = False
        for one in sent:
            if one.future is None:
                dropped = dropped or one.command is not _SETUP
            elif not one.future.done():
                one.future.set_exception(Unreachable(why))
        if dropped:
            self.on_dropped(why)

    @property
    def waiting(self) -> int:
        """Commands queued or written and not yet answered."""
        return len(self._queue) + len(self._sent)

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
            self._connecting = None
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
            self._soon = False
        queue, self._queue = self._queue, []
        self._fail([sent for _, sent in queue], "the connection to Redis is closed")
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            self._lost(protocol, "the connection to Redis is closed")


def _pack(args: Sequence[Any]) -> bytes:
    command: bytes = hiredis.pack_command(tuple(args))
    return command


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    """A TLS context from a ``rediss://`` URL's options (those redis-py reads too:
    ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_check_hostname``)."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = str(options.get("ssl_cert_reqs", "required")).lower()
    if reqs in ("none", "optional") or options.get("ssl_check_hostname") in (False, "false"):
        context.check_hostname = False
    if reqs == "none":
        context.verify_mode = ssl.CERT_NONE
    elif reqs == "optional":
        context.verify_mode = ssl.CERT_OPTIONAL
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context
