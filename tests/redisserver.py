"""A real redis-server process for the tests (Debian's, installed by scripts/redis-dev):
on a free loopback port, no persistence, stoppable and restartable on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def redis_server_path() -> str:
    done = subprocess.run([str(ROOT / "scripts" / "redis-dev"), "ensure"], check=True,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


class RedisServer:
    def __init__(self, binary: str, workdir: Path) -> None:
        self._binary = binary
        self._dir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self._dir), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        for _ in range(500):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"redis-server did not listen on {self.port}")

    async def stop(self) -> None:
        """Stops it abruptly (SIGKILL): its data is gone, as after a crash."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None


@contextlib.asynccontextmanager
async def redis_server(workdir: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(redis_server_path(), workdir)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
