"""The supervisor's port reservation: one concrete port the workers can share, no one else."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import pytest

from tokenwire.service._workers import reserve_port


def _bind(address: tuple[str, ...], family: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
def test_port_zero_becomes_one_port_the_workers_share(host: str) -> None:
    listen, reserved = reserve_port(f"{host}:0")
    try:
        assert listen.rpartition(":")[0] == host
        port = int(listen.rpartition(":")[2])
        assert port and {s.getsockname()[1] for s in reserved} == {port}
        for sock in reserved:
            address = sock.getsockname()
            with pytest.raises(OSError):  # reserved: a server without SO_REUSEPORT is refused
                _bind(address, sock.family, reuse_port=False)
            with _bind(address, sock.family, reuse_port=True) as worker:  # a worker binds
                worker.listen()
    finally:
        for sock in reserved:
            sock.close()


def test_a_port_in_use_is_refused() -> None:
    with _bind(("127.0.0.1", 0), socket.AF_INET, reuse_port=True) as other:
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError):  # even though it listens with SO_REUSEPORT too
            reserve_port(f"127.0.0.1:{port}")
    listen, reserved = reserve_port(f"127.0.0.1:{port}")  # free again
    assert listen == f"127.0.0.1:{port}"
    for sock in reserved:
        sock.close()


def test_only_tcp_addresses() -> None:
    with pytest.raises(ValueError, match="host:port"):
        reserve_port("unix:/tmp/tokenwire.sock")


async def test_a_worker_that_never_serves_is_killed_and_reported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker that hangs before serving (it never writes its ready byte) must not hold
    # the supervisor's start-up for ever.
    from tokenwire.service import _workers
    from tokenwire.service._config import Settings

    spawned: list[asyncio.subprocess.Process] = []
    real_exec = asyncio.create_subprocess_exec

    async def hanging_worker(*args: object, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real_exec(sys.executable, "-c", "import time; time.sleep(60)", **kwargs)
        spawned.append(proc)
        return proc

    monkeypatch.setattr(_workers, "_START_TIMEOUT", 0.5)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", hanging_worker)
    supervisor = _workers._Supervisor(Settings(workers=2), "127.0.0.1:1")
    with pytest.raises(_workers.WorkerFailed, match="did not serve within 0.5s"):
        await asyncio.wait_for(supervisor._spawn(0), 10)
    assert spawned and spawned[0].returncode is not None  # killed, and reaped
