"""scripts/cluster, the README's Scale-out walkthrough: one command starts redis-server,
three replicas and HAProxy; one caller's concurrency limit and token budget hold across the
replicas the balancer spreads its calls over; a replica drained with `scripts/cluster drain`
loses no stream; `stop` leaves nothing running. The test Ollama stands in for the model."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenwire.client import AsyncClient, AsyncTokenStream, ResourceExhausted

ROOT = Path(__file__).resolve().parents[2]
WHOLE = "".join(f"w{i} " for i in range(40))


def _cluster(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / "cluster"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    env = dict(os.environ, TOKENWIRE_CLUSTER_DIR=str(tmp_path / "cluster"),
               TOKENWIRE_CLUSTER_FAKE_DELAY="0.05")
    started = _cluster(env, "start", "--fake", "--port", "0")
    try:
        assert started.returncode == 0, started.stderr
        target = started.stdout.strip().removeprefix("TOKENWIRE_TARGET=")
        yield env, target
    finally:
        state = (tmp_path / "cluster" / "state.env")
        pids = [int(line.split("=")[1]) for line in state.read_text().splitlines()
                if line.split("=")[0].endswith("_pid") and line.split("=")[1]] \
            if state.exists() else []
        stopped = _cluster(env, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert pids and not [pid for pid in pids if _alive(pid)]


async def _read(stream: AsyncTokenStream) -> str:
    async for _ in stream:
        pass
    return stream.text


def _stat(env: dict[str, str]) -> dict[str, tuple[str, int]]:
    """scripts/cluster status: each replica's HAProxy status and calls sent."""
    out = _cluster(env, "status").stderr
    rows = [line.split() for line in out.splitlines() if line.startswith("cluster:   r")]
    return {row[1]: (row[2], int(row[5])) for row in rows}


async def test_start_limits_across_replicas_drain_stop(
        cluster: tuple[dict[str, str], str], tool_bin: Path) -> None:
    env, target = cluster
    # The two calls it prints, as printed: the CLI and grpcurl (reflection through HAProxy).
    cli = _run(str(ROOT / ".venv" / "bin" / "tokenwire"), "--target", target, "--metadata",
               "authorization=Bearer bob-token", "generate", "-q", "smollm2:135m",
               "Why is the sky blue?")
    assert cli.returncode == 0 and cli.stdout.strip() == WHOLE.strip(), cli.stderr
    grpcurl = _run(str(tool_bin / "grpcurl"), "-plaintext", "-H",
                   "authorization: Bearer bob-token", "-d",
                   '{"model":"smollm2:135m","prompt":"Hello"}', target,
                   "tokenwire.v1.GenerationService/Generate")
    assert grpcurl.returncode == 0 and '"done": true' in grpcurl.stdout, grpcurl.stderr
    assert {name: status for name, (status, _) in _stat(env).items()} == {
        "r1": "UP", "r2": "UP", "r3": "UP"}
    alice = AsyncClient(target, metadata=[("authorization", "Bearer alice-token")])
    carol = AsyncClient(target, metadata=[("authorization", "Bearer carol-token")])
    bob = AsyncClient(target, metadata=[("authorization", "Bearer bob-token")])
    async with alice, carol, bob:
        # alice: max_streams = 2 in all; four calls at once, over three replicas.
        results = await asyncio.gather(*(_read(alice.generate("smollm2:135m", "hi"))
                                         for _ in range(4)), return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == [
            "ResourceExhausted", "ResourceExhausted", "str", "str"]
        assert [r for r in results if isinstance(r, str)] == [WHOLE, WHOLE]
        # carol: 300 tokens a minute, 72 reserved a call: four fit, whichever replica.
        results = await asyncio.gather(*(_read(carol.generate("smollm2:135m", "hi"))
                                         for _ in range(8)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(refused) == 4 and all("tokens per minute" in str(r) for r in refused)
        sent = _stat(env)
        assert all(calls >= 3 for _, calls in sent.values()), sent  # spread over all three
        # Drain replica 1 while bob streams on all three: nothing lost.
        streams = [bob.generate("smollm2:135m", "hi") for _ in range(3)]
        reading = [asyncio.create_task(_read(s)) for s in streams]
        for _ in range(200):
            if all(s.text for s in streams):
                break
            await asyncio.sleep(0.02)
        drained = _cluster(env, "drain", "1")
        assert drained.returncode == 0, drained.stderr
        more = [await _read(bob.generate("smollm2:135m", "hi")) for _ in range(3)]
        assert await asyncio.gather(*reading) == [WHOLE] * 3
        assert more == [WHOLE] * 3
        assert _stat(env)["r1"][0] == "DOWN"
    # `start` again brings it back.
    again = _cluster(env, "start")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"TOKENWIRE_TARGET={target}"
    assert _stat(env)["r1"][0] == "UP"
