"""Fixtures of the reliability tier: real certificates and a figures record.

Tests that measure something print their figures (run pytest with ``-s`` to see
them) and store them in ``figures``; at the end of the session the record is
written as JSON to ``$TOKENWIRE_FIGURES_DIR/reliability.json`` when that
variable is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.pki import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, Any]]:
    record: dict[str, Any] = {}
    yield record
    directory = os.environ.get("TOKENWIRE_FIGURES_DIR")
    if directory and record:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "reliability.json").write_text(json.dumps(record, indent=2, sort_keys=True)
                                               + "\n")
