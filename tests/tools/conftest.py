"""External tools (buf, grpcurl) at their pinned versions, installed on first
use by scripts/tools into a cache outside the repo; never skipped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tool_bin() -> Path:
    result = subprocess.run([str(ROOT / "scripts" / "tools")], capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, f"scripts/tools failed:\n{result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])
