"""grpc-go's weighted_round_robin over three tokenwire replicas, one of them slow.

Each replica is an in-process server with its own test Ollama; the slow one's streams its
tokens six times slower, as a replica on a busier or smaller engine would. The Go program
(tests/polyglot/go/wrr) calls Generate from 8 workers back to back, first with plain
round_robin, then with weighted_round_robin, which reads the ORCA report of every call's
trailers (tokenwire's --load-reports, on by default). Round robin gives each replica a third
of the calls however slow it is; the weighted policy must send the slow one clearly fewer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_weighted_round_robin import replicas
from tests.polyglot.test_polyglot import CACHE, HERE, ROOT, _need, _run, polyglot_bin

__all__ = ["polyglot_bin"]  # the fixture, shared with test_polyglot

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def wrr_program(polyglot_bin: Path) -> Path:
    go = _need("go", "Go toolchain")
    env = dict(os.environ, PATH=f"{polyglot_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    _run([str(polyglot_bin / "buf"), "generate"], ROOT, env)  # the stubs in go/gen
    binary = CACHE / "polyglot" / f"go-wrr-{hashlib.sha256(bytes(ROOT)).hexdigest()[:12]}"
    _run([go, "build", "-o", str(binary), "./wrr"], HERE / "go", env)
    return binary


async def _spread(program: Path, policy: str, targets: list[str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        str(program), "-policy", policy, "-workers", "8", "-warmup", "3s", "-measure", "6s",
        *targets, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_weighted_round_robin_sends_fewer_calls_to_the_slow_replica(
        wrr_program: Path) -> None:
    async with replicas() as built:
        targets = [r.target for r in built]
        slow = targets[-1]
        plain = await _spread(wrr_program, "round_robin", targets)
        weighted = await _spread(wrr_program, "weighted_round_robin", targets)
    print("\nround_robin:", json.dumps(plain), "\nweighted_round_robin:", json.dumps(weighted))
    for result in (plain, weighted):
        assert result["codes"] == {"OK": result["ok"]}, result  # no call failed
        assert set(result["calls"]) == set(targets), result
        assert result["bad_reports"] == 0 and result["with_report"] == result["ok"], result
    share = {name: r["calls"][slow] / r["ok"] for name, r in
             (("plain", plain), ("weighted", weighted))}
    # round robin: a third each, however slow the replica is
    assert 0.25 < share["plain"] < 0.42, plain
    # weighted: about 1/6 of a fast replica's share (weights = calls/s over in-flight
    # calls = --max-streams over call duration), far under a third on a loaded machine too
    assert share["weighted"] < 0.6 * share["plain"] and share["weighted"] < 0.2, weighted
    reports = weighted["reports"]
    assert reports[slow]["weight"] < 0.5 * min(reports[t]["weight"] for t in targets[:2])
