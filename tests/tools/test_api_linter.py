"""Google's API linter on the contract: no finding, with the rules protos/api-linter.yaml
and the (-- api-linter: ... --) comments of the protos turn off (each with its reason)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.tools.conftest import ROOT

CONFIG = ROOT / "protos" / "api-linter.yaml"
PROTOS = ROOT / "protos"
GOOGLEAPIS = ROOT / "third_party" / "googleapis"


def _lint(tool_bin: Path, proto_root: Path, files: list[str]) -> list[dict[str, Any]]:
    """The findings, one dict per problem (with its file)."""
    result = subprocess.run(
        [str(tool_bin / "api-linter"), "--config", str(CONFIG), "--output-format", "json",
         "-I", str(proto_root), "-I", str(GOOGLEAPIS), *files],
        cwd=proto_root, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return [dict(problem, file=entry["file_path"]) for entry in json.loads(result.stdout)
            for problem in entry["problems"]]


def _show(problems: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{p['file']}:{p['location']['start_position']['line_number']}: {p['rule_id']}: "
        f"{p['message']}" for p in problems)


def test_the_contract_has_no_finding(tool_bin: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    assert "tokenwire/v1/generation.proto" in files
    problems = _lint(tool_bin, PROTOS, files)
    assert not problems, (
        "fix these, or disable a rule with its reason (at the element in the .proto, or for "
        f"the whole API in {CONFIG.relative_to(ROOT)}):\n{_show(problems)}")


def test_the_linter_finds_what_the_config_leaves_on(tool_bin: Path, tmp_path: Path) -> None:
    """The gate can fail: a copy of the contract with a field that breaks rules left on (a
    camelCase name, a Timestamp not named *_time) is reported, and a rule disabled for the
    whole API (uint32) is not."""
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS / "tokenwire", copy / "tokenwire")
    proto = copy / "tokenwire" / "v1" / "generation.proto"
    text = proto.read_text()
    anchor = "message Embedding {\n"
    assert anchor in text
    proto.write_text(text.replace(anchor, anchor + "  // Probe.\n  google.protobuf.Timestamp "
                                  "lastSeen = 90 [(google.api.field_behavior) = OUTPUT_ONLY];\n"
                                  "  // Probe.\n  uint32 hits = 91 [(google.api.field_behavior) "
                                  "= OUTPUT_ONLY];\n", 1))
    problems = _lint(tool_bin, copy, ["tokenwire/v1/generation.proto"])
    rules = {p["rule_id"] for p in problems}
    assert {"core::0140::lower-snake", "core::0142::time-field-names"} <= rules, _show(problems)
    assert "core::0141::forbidden-types" not in rules
