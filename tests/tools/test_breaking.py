"""The compatibility gate: `buf breaking` with the WIRE_JSON rules of buf.yaml.

What is compared with what (every baseline is read from git, so a fresh clone of main with
its full history is all it needs: no branch names, remote refs or reflog):

1. Every commit that changed protos/ is compared with its first parent: the contract that
   commit replaced. Merges into main are compared with the main they merged into
   (``--first-parent``), and a submission of several commits has each one checked. The commit
   that brought protos/ in has no contract before it and is compared with itself. When a
   release tag ``v*`` is reachable from HEAD, only commits after the newest one are walked,
   and HEAD's contract is also compared with that release as a whole.
2. Uncommitted changes (working tree, index, untracked files among the contract files) are
   compared with HEAD: what you are about to commit must not break what is committed.
3. A deliberate break (only before a release) says so in its commit message with a trailer
   ``Contract-Break: <why>``; that commit is then not held against its parent. Never use it
   after a release: the tag comparison has no such exemption.

Baselines are exported with ``git archive`` (buf.yaml and its modules) into a directory and given
to buf as a directory input, which avoids buf's own git input (clone depth, ref syntax).
A shallow clone fails with a clear message instead of comparing with a wrong baseline.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.tools.conftest import ROOT

#: The contract's files: buf.yaml and its modules (protos/ and the googleapis file it imports).
THIRD_PARTY = "third_party/googleapis"
CONTRACT = ("buf.yaml", "protos", THIRD_PARTY)
TRAILER = "Contract-Break"


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr.decode()}"
    return result.stdout.decode()


def _export(ref: str, dest: Path) -> Path:
    """The contract files as of ``ref``, in ``dest``."""
    present = [p for p in CONTRACT if _git("ls-tree", "--name-only", ref, "--", p).strip()]
    dest.mkdir(parents=True)
    if present:
        raw = subprocess.run(["git", "archive", "--format=tar", ref, "--", *present], cwd=ROOT,
                             capture_output=True, timeout=60, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(dest)  # our own repository's files
    if not (dest / "buf.yaml").exists():  # older than the buf config: use today's module layout
        shutil.copy(ROOT / "buf.yaml", dest / "buf.yaml")
    if not (dest / THIRD_PARTY).exists():  # older than the googleapis import: today's copy
        shutil.copytree(ROOT / THIRD_PARTY, dest / THIRD_PARTY)
    return dest


def _breaking(buf: Path, current: Path, against: Path,
              error_format: str = "text") -> subprocess.CompletedProcess[str]:
    """buf breaking on the module protos/ of two workspaces: the googleapis module beside it
    is only there for its imports (and a workspace that gained a module would not compare
    module by module)."""
    return subprocess.run([str(buf), "breaking", str(current / "protos"), "--against",
                           str(against / "protos"),
                           "--error-format", error_format],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def _require_full_history() -> None:
    if _git("rev-parse", "--is-shallow-repository").strip() == "true":
        pytest.fail("the breaking-change gate needs the full git history; this clone is "
                    "shallow (CI: clone without --depth, or `git fetch --unshallow`)",
                    pytrace=False)


def _latest_release() -> str | None:
    tags = _git("tag", "--merged", "HEAD", "--list", "v*", "--sort=-creatordate").split()
    return tags[0] if tags else None


def test_every_contract_change_is_compatible_with_the_one_before(tool_bin: Path,
                                                                  tmp_path: Path) -> None:
    _require_full_history()
    release = _latest_release()
    span = [f"{release}..HEAD"] if release else ["HEAD"]
    commits = _git("log", "--first-parent", "--format=%H", *span, "--", *CONTRACT).split()
    checked, failures = 0, []
    for commit in commits:
        parents = _git("rev-list", "--parents", "-n", "1", commit).split()[1:]
        had_protos = bool(parents) and bool(_git("ls-tree", "--name-only", parents[0],
                                                 "--", "protos").strip())
        allowed = _git("log", "-1", f"--format=%(trailers:key={TRAILER},valueonly)",
                       commit).strip()
        if allowed:
            continue
        current = _export(commit, tmp_path / commit / "current")
        against = _export(parents[0] if had_protos else commit, tmp_path / commit / "against")
        result = _breaking(tool_bin / "buf", current, against)
        checked += 1
        if result.returncode != 0:
            subject = _git("log", "-1", "--format=%s", commit).strip()
            failures.append(f"{commit[:12]} {subject}\n{result.stdout}{result.stderr}")
    assert not failures, (
        "contract changes that break WIRE_JSON compatibility (reserve removed fields, never "
        f"renumber, retype or rename; a deliberate pre-release break needs a '{TRAILER}:' "
        "trailer):\n\n" + "\n".join(failures))
    assert checked or release or not commits, "no contract commit was checked"
    if release:
        result = _breaking(tool_bin / "buf", _export("HEAD", tmp_path / "head"),
                           _export(release, tmp_path / release))
        assert result.returncode == 0, f"HEAD breaks released {release}:\n{result.stdout}"


def test_uncommitted_contract_changes_are_compatible_with_head(tool_bin: Path,
                                                               tmp_path: Path) -> None:
    """Runs on a clean tree too (then HEAD against itself, which must pass)."""
    head = _export("HEAD", tmp_path / "head")
    result = _breaking(tool_bin / "buf", ROOT, head)
    changed = _git("status", "--porcelain", "--", *CONTRACT).strip()
    assert result.returncode == 0, (
        f"uncommitted changes break the contract of HEAD:\n{changed}\n{result.stdout}"
        f"{result.stderr}")


# A small contract of its own, so that these checks of the gate do not depend on what
# generation.proto holds today; the rules are the real ones from buf.yaml.
PROBE = """syntax = "proto3";

package tokenwire.v1;

message Probe {
  string prompt = 1;
  string system = 2;
  bool raw = 3;
}

enum Mode {
  MODE_UNSPECIFIED = 0;
  MODE_LOW = 1;
}
"""


def _probe(folder: Path, text: str) -> Path:
    (folder / "protos" / "tokenwire" / "v1").mkdir(parents=True)
    (folder / "protos" / "tokenwire" / "v1" / "probe.proto").write_text(text)
    shutil.copy(ROOT / "buf.yaml", folder / "buf.yaml")
    shutil.copytree(ROOT / THIRD_PARTY, folder / THIRD_PARTY)
    return folder


def _changed(tmp_path: Path, old: str, new: str) -> tuple[Path, Path]:
    assert old in PROBE
    return (_probe(tmp_path / "changed", PROBE.replace(old, new, 1)),
            _probe(tmp_path / "base", PROBE))


@pytest.mark.parametrize(("old", "new", "rule"), [
    ("string prompt = 1;", "string prompt_text = 1;", "FIELD_SAME_JSON_NAME"),
    ("string prompt = 1;", "bytes prompt = 1;", "FIELD_WIRE_JSON_COMPATIBLE_TYPE"),
    ("string prompt = 1;", "int64 prompt = 1;", "FIELD_WIRE_JSON_COMPATIBLE_TYPE"),
    ("  string system = 2;\n", "", "FIELD_NO_DELETE_UNLESS_NUMBER_RESERVED"),
    ("MODE_LOW = 1;", "MODE_LOW = 2;", "ENUM_VALUE_NO_DELETE_UNLESS_NUMBER_RESERVED"),
], ids=["rename", "string-to-bytes", "string-to-int64", "delete", "renumber-enum"])
def test_gate_catches_wire_and_json_breaks(tool_bin: Path, tmp_path: Path, old: str, new: str,
                                           rule: str) -> None:
    """The gate itself works: known breaks fail with their rule."""
    changed, base = _changed(tmp_path, old, new)
    result = _breaking(tool_bin / "buf", changed, base, error_format="json")
    assert result.returncode != 0, f"buf breaking missed: {old!r} -> {new!r}"
    rules = {json.loads(line)["type"] for line in result.stdout.splitlines() if line}
    assert rule in rules, (rules, result.stderr)


@pytest.mark.parametrize(("old", "new"), [
    ("  bool raw = 3;\n", "  bool raw = 3;\n  string template = 4;\n"),
    ("  string system = 2;\n", "  reserved 2;\n  reserved \"system\";\n"),
    ("  MODE_LOW = 1;\n", "  MODE_LOW = 1;\n  MODE_HIGH = 2;\n"),
], ids=["add-field", "delete-and-reserve", "add-enum-value"])
def test_gate_lets_compatible_changes_through(tool_bin: Path, tmp_path: Path, old: str,
                                              new: str) -> None:
    changed, base = _changed(tmp_path, old, new)
    result = _breaking(tool_bin / "buf", changed, base)
    assert result.returncode == 0, result.stdout + result.stderr
