"""Real parts the tests run as processes, from Debian (installed by scripts/debian-tools):
a redis-server (free loopback port, no persistence, killable and restartable on the same
port) and HAProxy running deploy/haproxy.cfg, balancing gRPC (HTTP/2) over tokenwire
replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def debian_tool(name: str) -> str:
    """The path of ``name`` (redis-server, haproxy), installed first if it is missing."""
    done = subprocess.run([str(ROOT / "scripts" / "debian-tools"), name], check=True,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _listening(port: int, what: str) -> None:
    for _ in range(500):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} did not listen on {port}")


class RedisServer:
    def __init__(self, binary: str, workdir: Path, *args: str) -> None:
        self._binary = binary
        self._dir = workdir
        self._args = args  # more of redis-server's options
        self.port = _free_port()
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self._dir), *self._args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await _listening(self.port, "redis-server")

    async def stop(self) -> None:
        """Stops it abruptly (SIGKILL): its data is gone, as after a crash."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None


@contextlib.asynccontextmanager
async def redis_server(workdir: Path, *args: str) -> AsyncIterator[RedisServer]:
    server = RedisServer(debian_tool("redis-server"), workdir, *args)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def health_check_bytes(service: str = "readiness") -> bytes:
    """The raw HTTP/2 of one grpc.health.v1.Health/Check call for ``service``, as
    deploy/haproxy.cfg's ``tcp-check send-binary`` writes it (hex): the connection
    preface, an empty SETTINGS frame, HEADERS and DATA on stream 1."""
    def frame(kind: int, flags: int, payload: bytes) -> bytes:
        stream = 0 if kind == 4 else 1
        return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
                + stream.to_bytes(4, "big") + payload)

    def literal(name: bytes, value: bytes) -> bytes:  # without indexing, no Huffman
        return name + bytes([len(value)]) + value

    headers = (b"\x83\x86"  # :method POST, :scheme http (static table 3 and 6)
               + literal(b"\x04", b"/grpc.health.v1.Health/Check")  # :path (4)
               + literal(b"\x01", b"haproxy")  # :authority (1)
               + literal(b"\x0f\x10", b"application/grpc")  # content-type (31)
               + b"\x00\x02te\x08trailers")  # a new name
    message = b"\x0a" + bytes([len(service)]) + service.encode()  # field 1, a string
    data = b"\x00" + len(message).to_bytes(4, "big") + message
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, b"")
            + frame(1, 0x4, headers) + frame(0, 0x1, data))


#: The load balancer's configuration users copy (deploy/haproxy.cfg); the tests run it as is,
#: with their own addresses in its environment variables.
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


class Haproxy:
    """HAProxy running deploy/haproxy.cfg: HTTP/2 cleartext on both sides (as gRPC needs),
    each call to the replica with the fewest running (leastconn), replicas checked with
    gRPC health on their ``--health-listen`` port. ``backends`` are (main, health)
    targets, at most three (the file's servers r1..r3); with fewer, the last is repeated."""

    def __init__(self, binary: str, workdir: Path, backends: list[tuple[str, str]]) -> None:
        assert 1 <= len(backends) <= 3, "deploy/haproxy.cfg has three servers"
        self._binary = binary
        self.port = _free_port()
        self.admin = workdir / "haproxy.sock"
        self.env = {"TOKENWIRE_LB_LISTEN": self.target, "TOKENWIRE_LB_ADMIN": str(self.admin)}
        for i in range(3):
            main, health = backends[min(i, len(backends) - 1)]
            self.env[f"TOKENWIRE_REPLICA_{i + 1}"] = main
            self.env[f"TOKENWIRE_HEALTH_{i + 1}"] = health.rsplit(":", 1)[1]
        self.log: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self._binary, "-db", "-f", str(HAPROXY_CFG), env={**os.environ, **self.env},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read(self._proc))
        await _listening(self.port, "haproxy")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := (await proc.stderr.readline()).decode():
            self.log.append(line)

    async def command(self, line: str) -> str:
        """One command on the admin socket (``show stat``, ``set server ...``)."""
        reader, writer = await asyncio.open_unix_connection(str(self.admin))
        writer.write(line.encode() + b"\n")
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer.decode()

    async def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the replicas, by server name (r1..r3): status (UP, DOWN,
        DRAIN...), scur (calls running now), stot (calls sent in all)..."""
        text = await self.command("show stat")
        head, *rows = [line for line in text.splitlines() if line]
        names = head.lstrip("# ").split(",")
        found = [dict(zip(names, row.split(","), strict=False)) for row in rows]
        return {r["svname"]: r for r in found if r["pxname"] == "tokenwire"
                and r["svname"] not in ("FRONTEND", "BACKEND")}

    async def wait_status(self, server: str, status: str) -> None:
        """Until HAProxy's health checks give ``server`` this status (UP, DOWN...; 15 s
        at most)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while (now := (await self.servers())[server]["status"]) != status:
            if loop.time() > deadline:
                raise AssertionError(f"{server} is {now}, not {status}:\n{''.join(self.log)}")
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: every connection through it drops at once."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            await self._reader
        self._proc = self._reader = None


@contextlib.asynccontextmanager
async def haproxy(workdir: Path, backends: list[tuple[str, str]]) -> AsyncIterator[Haproxy]:
    """deploy/haproxy.cfg in front of ``backends`` ((main, health) targets), every one of
    them UP (its health checks passed) when this yields."""
    balancer = Haproxy(debian_tool("haproxy"), workdir, backends)
    await balancer.start()
    try:
        for i in range(len(backends)):
            await balancer.wait_status(f"r{i + 1}", "UP")
        yield balancer
    finally:
        await balancer.kill()
