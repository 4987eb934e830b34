"""``--workers N``: a supervisor and N server processes sharing one port (SO_REUSEPORT).

The supervisor serves nothing itself. It reserves the port, and the ``--health-listen``
one (with bound, not listening, SO_REUSEPORT sockets, so ``:0`` becomes one concrete port
for all), starts each worker as
``python -m tokenwire.service._main`` with the settings in the environment (not on the
command line, where ``ps`` shows them), restarts a worker that dies (with backoff), and
forwards SIGTERM/SIGINT so each worker drains as a single server does.

Each worker gets one end of a socket pair, named in ``TOKENWIRE_WORKER=<index>:<fd>``: it
writes one byte there once it serves, and shuts down when the supervisor's end closes (the
supervisor is gone), so no worker outlives its supervisor.

With ``--metrics-listen``, the workers keep their figures in files in a private directory
(prometheus_client's multiprocess mode) and the supervisor serves their sum there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ._config import _ENV_PREFIX, Settings
from ._metrics import MULTIPROC_ENV, MetricsEndpoint, multiprocess_registry, worker_dead

__all__ = ["WORKER_ENV", "WorkerFailed", "WorkerLink", "reserve_port", "supervise"]

log = logging.getLogger("tokenwire.workers")

WORKER_ENV = "TOKENWIRE_WORKER"
_BACKOFF_MIN, _BACKOFF_MAX = 0.5, 10.0
#: A worker that has not said it serves after this long is killed (start-up failed).
_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class WorkerLink:
    """A worker's end of its link to the supervisor."""

    index: int
    fd: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerLink | None:
        value = environ.get(WORKER_ENV)
        if not value:
            return None
        index, _, fd = value.partition(":")
        return cls(int(index), int(fd))

    def ready(self, on_orphaned: Callable[[], None]) -> None:
        """Tells the supervisor this worker serves; calls ``on_orphaned`` once the
        supervisor's end closes (nothing else is ever sent on the link)."""
        os.write(self.fd, b"\x01")
        loop = asyncio.get_running_loop()

        def closed() -> None:
            loop.remove_reader(self.fd)
            log.warning("the supervisor is gone: shutting down")
            on_orphaned()

        loop.add_reader(self.fd, closed)


class WorkerFailed(Exception):
    """A worker exited before it served."""

    def __init__(self, index: int, code: int | None) -> None:
        super().__init__(
            f"worker {index} exited with {_exit_text(code)} before it served" if code is not None
            else f"worker {index} did not serve within {_START_TIMEOUT:g}s; killed it")


def _exit_text(code: int) -> str:
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def reserve_port(listen: str) -> tuple[str, list[socket.socket]]:
    """Binds (without listening) SO_REUSEPORT sockets on every address of ``listen``:
    they keep the port for the workers. Returns ``listen`` with the concrete port.
    Refuses a port that something already listens on."""
    host, _, port_text = listen.rpartition(":")
    if not port_text.isdigit():
        raise ValueError(f"--workers needs a TCP address host:port, not {listen!r}")
    port = int(port_text)
    infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    if port:  # each bind fails if a server (even one with SO_REUSEPORT) listens there
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]  # the first one picks it when it was 0
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return f"{host}:{port}", sockets


class _Supervisor:
    def __init__(self, settings: Settings, listen: str, metrics_dir: str | None = None,
                 health_listen: str = "") -> None:
        self._settings, self._listen = settings, listen
        self._health_listen = health_listen
        self._metrics_dir = metrics_dir
        self._env = dict(os.environ)
        # The workers write their figures under metrics_dir; the supervisor serves the sum.
        # Each worker serves the health port too, shared like the main one.
        for name, value in dataclasses.asdict(dataclasses.replace(
                settings, workers=1, listen=listen, metrics_listen="",
                health_listen=health_listen)).items():
            self._env[_ENV_PREFIX + name.upper()] = str(value)
        if metrics_dir is not None:
            self._env[MULTIPROC_ENV] = metrics_dir
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._links: dict[int, socket.socket] = {}
        self._stopping = asyncio.Event()
        self._signalled = False

    async def run(self) -> int:
        """Starts the workers, keeps them running until a signal, waits for them to drain.
        Returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        count = self._settings.workers
        endpoint = None
        if self._metrics_dir is not None:
            endpoint = MetricsEndpoint(multiprocess_registry(self._metrics_dir))
            try:
                await endpoint.start(self._settings.metrics_listen)
            except OSError as exc:
                log.error("cannot serve metrics on %s: %s", self._settings.metrics_listen, exc)
                return 1
            log.info("metrics on %s (the sum of all workers)", endpoint.url)
        starting = [asyncio.create_task(self._spawn(i)) for i in range(count)]
        try:
            try:
                procs = await asyncio.gather(*starting)
            except WorkerFailed as exc:
                if not self._stopping.is_set():
                    log.error("%s; stopping the others", exc)
                self._stopping.set()
                self._signal_all(signal.SIGTERM)
                await asyncio.gather(*starting, return_exceptions=True)
                await asyncio.gather(*(p.wait() for p in self._procs.values()))
                return 0 if self._signalled else 1
            log.info("tokenwire-server listening on %s with %d workers", self._listen, count)
            if self._health_listen:
                log.info("health checks on %s (plaintext, health only, no credentials; "
                         "each worker answers its own connections)", self._health_listen)
            keepers = asyncio.gather(*(self._keep(i, p) for i, p in enumerate(procs)))
            await self._stopping.wait()
            limit = self._settings.shutdown_grace + 10.0
            try:
                codes = await asyncio.wait_for(asyncio.shield(keepers), limit)
            except TimeoutError:
                log.error("workers still running %gs after the signal: killing them", limit)
                self._signal_all(signal.SIGKILL)
                codes = await keepers
            log.info("stopped")
            return 0 if all(code == 0 for code in codes) else 1
        finally:
            for link in self._links.values():
                link.close()
            if endpoint is not None:
                await endpoint.aclose()

    def _on_signal(self) -> None:
        if self._stopping.is_set():
            log.warning("second signal: killing the workers")
            self._signal_all(signal.SIGKILL)
            return
        log.info("shutting down: each worker drains for up to %gs",
                 self._settings.shutdown_grace)
        self._signalled = True
        self._stopping.set()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        """Starts worker ``index`` and returns once it serves."""
        mine, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tokenwire.service._main",
                env={**self._env, WORKER_ENV: f"{index}:{theirs.fileno()}"},
                pass_fds=(theirs.fileno(),), start_new_session=True)
        finally:
            theirs.close()
        self._procs[index] = proc
        if self._stopping.is_set():
            proc.send_signal(signal.SIGTERM)
        log.info("worker %d starting (pid %d)", index, proc.pid)
        mine.setblocking(False)
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                ready = await asyncio.get_running_loop().sock_recv(mine, 1)
        except TimeoutError:
            mine.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise WorkerFailed(index, None) from None
        if not ready:  # it exited
            mine.close()
            raise WorkerFailed(index, await proc.wait())
        old = self._links.pop(index, None)
        if old is not None:
            old.close()
        self._links[index] = mine  # its EOF tells the worker that the supervisor is gone
        return proc

    async def _keep(self, index: int, proc: asyncio.subprocess.Process | None) -> int:
        """Restarts worker ``index`` whenever it exits, until the supervisor stops.
        Returns the worker's last exit code."""
        loop = asyncio.get_running_loop()
        delay = _BACKOFF_MIN
        while True:
            if proc is not None:
                started = loop.time()
                code = await proc.wait()
                if self._metrics_dir is not None:
                    worker_dead(proc.pid, self._metrics_dir)
                if self._stopping.is_set():
                    return code
                if loop.time() - started > _BACKOFF_MAX:
                    delay = _BACKOFF_MIN
                log.error("worker %d (pid %d) exited with %s; restarting it in %gs",
                          index, proc.pid, _exit_text(code), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return 0
            delay = min(delay * 2, _BACKOFF_MAX)
            try:
                proc = await self._spawn(index)
            except WorkerFailed as exc:
                if not self._stopping.is_set():
                    log.error("%s; retrying in %gs", exc, delay)
                proc = None
            else:
                log.warning("worker %d restarted (pid %d)", index, proc.pid)


def supervise(settings: Settings) -> int:
    """Runs ``settings.workers`` workers until SIGTERM or SIGINT. Returns the exit code."""
    reserved: list[socket.socket] = []
    concrete: list[str] = []  # listen, then health_listen ("" when off)
    for address in (settings.listen, settings.health_listen):
        if not address:
            concrete.append("")
            continue
        try:
            chosen, sockets = reserve_port(address)
        except (OSError, ValueError) as exc:
            log.error("cannot listen on %s: %s", address, exc)
            for sock in reserved:
                sock.close()
            return 1
        concrete.append(chosen)
        reserved += sockets
    listen, health_listen = concrete
    metrics_dir = (tempfile.mkdtemp(prefix="tokenwire-metrics-")
                   if settings.metrics_listen else None)
    try:
        return asyncio.run(_Supervisor(settings, listen, metrics_dir, health_listen).run())
    finally:
        for sock in reserved:
            sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
