"""Small helpers for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status sent in the trailers (fails if there is none)."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    raise AssertionError(f"no rich status in trailers of {err!r}")


def detail(err: grpc.aio.AioRpcError, kind: type[Any]) -> Any:
    """The first detail of the given google.rpc type, unpacked."""
    for packed in rich_status(err).details:
        message = kind()
        if packed.Unpack(message):
            return message
    raise AssertionError(f"no {kind.__name__} in details of {err!r}")


def violations(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    bad = detail(err, error_details_pb2.BadRequest)
    return [(v.field, v.description) for v in bad.field_violations]


def reason(err: grpc.aio.AioRpcError) -> str:
    return str(detail(err, error_details_pb2.ErrorInfo).reason)


def joined(tokens: list[pb.Token]) -> str:
    return "".join(t.text for t in tokens)


def last_body(fake: Any, path: str) -> Any:
    """The JSON body of the latest request to ``path`` (health probes run in between)."""
    return [r for r in fake.requests if r.path == path][-1].body

_PATIENCE = 20.0  # seconds a server process gets to log a line or to exit


class ServerProcess:
    """``tokenwire-server`` as a real process; its stderr is read into ``lines`` as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.target = ""
        self._eof = False
        self._more = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := (await self.proc.stderr.readline()).decode():
            async with self._more:
                self.lines.append(line)
                self._more.notify_all()
        async with self._more:
            self._eof = True
            self._more.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, text: str, *, after: int = 0) -> str:
        """The first line from index ``after`` on that contains ``text``."""
        def found() -> bool:
            return any(text in line for line in self.lines[after:]) or self._eof

        async with self._more:
            await asyncio.wait_for(self._more.wait_for(found), _PATIENCE)
        for line in self.lines[after:]:
            if text in line:
                return line
        raise AssertionError(f"the server exited without logging {text!r}:\n{self.output}")

    async def metrics_port(self) -> int:
        """The port of its ``--metrics-listen`` endpoint, as it logged it."""
        line = await self.wait_for("metrics on")
        return int(line.rsplit(":", 1)[1].split("/")[0])

    async def health_target(self) -> str:
        """The ``host:port`` of its ``--health-listen`` server, as it logged it."""
        line = await self.wait_for("health checks on")
        return line.split("health checks on ")[1].split()[0]

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Sends ``sig``; returns the exit code once the process and its output ended."""
        self.proc.send_signal(sig)
        return await self.exited()

    async def exited(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), _PATIENCE)
        await self._reader
        return code


@contextlib.asynccontextmanager
async def server_process(ollama_url: str, *args: str, ready: bool = True,
                         **env: str) -> AsyncIterator[ServerProcess]:
    """Starts ``python -m tokenwire.service._main`` on 127.0.0.1:0 with flags ``args`` and
    TOKENWIRE_* variables ``env``; when ``ready``, waits for its "listening on" line and
    sets ``target``. Kills it on exit if it still runs."""
    environ = dict(os.environ, TOKENWIRE_OLLAMA_URL=ollama_url, TOKENWIRE_LISTEN="127.0.0.1:0",
                   **env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenwire.service._main", *args, env=environ,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    server = ServerProcess(proc)
    try:
        if ready:
            line = await server.wait_for("listening on")
            server.target = line.split("listening on ")[1].split()[0]
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()
            await server.exited()


# Channels with the same target and arguments share one connection (grpc's global
# subchannel pool); with this option each has its own, so the kernel may pick another
# --workers process for it.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


async def served_by(server: ServerProcess, calls: int, request: pb.GenerateRequest,
                    check: Callable[[list[pb.Token]], None]) -> set[int]:
    """Makes ``calls`` concurrent Generate calls to a ``--workers`` server, each on a
    connection of its own, ``check``s each answer, and returns the indices of the workers
    that served them (from the access log, whose lines carry worker= and the request id)."""
    async def call(rid: str) -> None:
        async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as ch:
            check([t async for t in GenerationServiceStub(ch).Generate(
                request, timeout=60, metadata=(("x-request-id", rid),))])

    rids = [f"rid-{os.urandom(4).hex()}" for _ in range(calls)]
    await asyncio.gather(*(call(rid) for rid in rids))
    workers = set()
    for rid in rids:
        line = await server.wait_for(f"rid={rid} ")
        workers.add(int(re.findall(r" worker=(\d+) tokenwire\.access ", line)[0]))
    return workers


# --- Prometheus scrapes -------------------------------------------------------------


async def scrape(port: int, path: str = "/metrics", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.get(f"http://127.0.0.1:{port}{path}", headers=headers)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text scrape, by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)
