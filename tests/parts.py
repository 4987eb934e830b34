"""Real parts the tests run as processes, from Debian (installed by scripts/debian-tools):
a redis-server (free loopback port, no persistence, killable and restartable on the same
port) and an HAProxy balancing gRPC (HTTP/2) over tokenwire replicas."""

from __future__ import annotations

import asyncio
import contextlib
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


class Haproxy:
    """HAProxy in HTTP mode, HTTP/2 cleartext on both sides (as gRPC needs), balancing
    each call (each HTTP/2 stream) round robin over ``backends`` (host:port)."""

    def __init__(self, binary: str, workdir: Path, backends: list[str]) -> None:
        self._binary = binary
        self.port = _free_port()
        self._config = workdir / "haproxy.cfg"
        servers = "".join(f"    server r{i} {b} proto h2\n" for i, b in enumerate(backends))
        self._config.write_text(
            "defaults\n    mode http\n    timeout connect 2s\n    timeout client 120s\n"
            "    timeout server 120s\n"
            f"frontend grpc\n    bind 127.0.0.1:{self.port} proto h2\n"
            "    default_backend replicas\n"
            f"backend replicas\n    balance roundrobin\n{servers}")
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self._binary, "-db", "-f", str(self._config), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        await _listening(self.port, "haproxy")

    async def kill(self) -> None:
        """SIGKILL: every connection through it drops at once."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None


@contextlib.asynccontextmanager
async def haproxy(workdir: Path, backends: list[str]) -> AsyncIterator[Haproxy]:
    balancer = Haproxy(debian_tool("haproxy"), workdir, backends)
    await balancer.start()
    try:
        yield balancer
    finally:
        await balancer.kill()
