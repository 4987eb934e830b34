"""The proto gate: buf lint (STANDARD), buf format, and generated code drift."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

from tests.tools.conftest import ROOT


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def test_buf_lint(tool_bin: Path) -> None:
    result = _run(str(tool_bin / "buf"), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean(tool_bin: Path) -> None:
    result = _run(str(tool_bin / "buf"), "format", "--diff", "--exit-code")
    assert result.returncode == 0, "run `buf format -w`:\n" + result.stdout + result.stderr


def test_generated_python_is_current(tmp_path: Path) -> None:
    result = _run(str(ROOT / "scripts" / "gen-python"), str(tmp_path / "client"),
                  str(tmp_path / "service"))
    assert result.returncode == 0, result.stderr
    for folder, wanted in (
            (Path("tokenwire", "v1"),
             ["generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"]),
            (Path("tokenwire", "service", "orca"),
             ["orca_load_report_pb2.py", "orca_load_report_pb2.pyi"])):
        fresh = tmp_path / ("client" if folder.parts[1] == "v1" else "service") / folder
        committed = ROOT / ("client" if folder.parts[1] == "v1" else "service") / folder
        names = sorted(p.name for p in fresh.iterdir())
        assert names == wanted
        _, mismatch, errors = filecmp.cmpfiles(committed, fresh, names, shallow=False)
        assert not mismatch and not errors, (
            f"generated code is stale: {mismatch + errors}; run scripts/gen-python and commit")
