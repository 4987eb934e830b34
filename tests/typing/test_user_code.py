"""``mypy --strict`` on user code (user_code.py), as a user of tokenwire runs it.

The source tree stands in for the installed package: ``client/`` is on mypy's path and the
imported modules are read but not reported on (``follow_imports = silent``, as mypy treats
an installed package); the project's own gate (``mypy`` with pyproject.toml) checks them.
Building the wheel and checking the same file from a fresh venv is the packaging test's job.

One test copies ``client/tokenwire`` as an installed package would lie (found through a
Python's ``sys.path``, so mypy applies PEP 561) with ``tokenwire/v1`` lacking ``py.typed``:
mypy then cannot read the messages, and the client's signatures must hold all the same.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
USER_CODE = Path(__file__).with_name("user_code.py")
CONFIG = """\
[mypy]
strict = True
python_version = 3.11
mypy_path = {client}
follow_imports = silent
"""

WRONG = '''\
from typing import assert_type

from tokenwire.client import AsyncClient, Client, Completion, FinishReason
from tokenwire.v1 import generation_pb2


async def wrong(client: AsyncClient, sync: Client) -> None:
    assert_type(sync.list_models(), list[str])
    assert_type(await client.generate_text("m", "p"), str)
    stream = sync.generate("m", "p")
    print(stream.final.usage)
    done: Completion = sync.complete("m", "p")
    if done.finish_reason == generation_pb2.FINISH_REASON_STOP:
        pass
    print(FinishReason.STOP.proto + "")
'''
#: Line of WRONG -> the error code mypy must give there.
WRONG_ERRORS = {8: "assert-type", 9: "assert-type", 11: "union-attr", 13: "comparison-overlap",
                15: "operator"}

AWAITED = '''\
from typing import assert_type

from tokenwire.client import AsyncClient, Completion


async def main() -> None:
    async with AsyncClient() as client:
        assert_type(await client.generate_text("m", "p"), Completion)
        assert_type(await client.chat_text("m", []), Completion)
        assert_type(await client.complete("m", "p"), Completion)
        assert_type(await client.complete_chat("m", []), Completion)
        assert_type(await client.start("m", "p"), str)
        assert_type(await client.start_chat("m", []), str)
'''


def _mypy(tmp_path: Path, config: str, *files: Path | str) -> tuple[int, list[str]]:
    ini = tmp_path / "mypy.ini"
    ini.write_text(config.format(client=ROOT / "client"))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ini), "--no-incremental",
         "--show-error-codes", "--no-error-summary", *map(str, files)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if ": error: " in line]
    return result.returncode, lines or (result.stdout + result.stderr).splitlines()


def _installed_without_typed_v1(tmp_path: Path) -> Path:
    """A Python whose sys.path holds a copy of client/tokenwire (without v1/py.typed) and
    this venv's site-packages, but not the editable install's client/ folder."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "client" / "tokenwire", site / "tokenwire",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (site / "tokenwire" / "v1" / "py.typed").unlink()
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True)
    # .pth files are read in site directories only: this venv's own (editable) .pth is not
    here = sysconfig.get_paths()["purelib"]
    Path(purelib.stdout.strip(), "user.pth").write_text(f"{site}\n{here}\n")
    return python


def test_user_code_passes_mypy_strict_and_wrong_code_does_not(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.py"
    wrong.write_text(WRONG)
    code, errors = _mypy(tmp_path, CONFIG, USER_CODE, wrong)
    assert code == 1, errors
    in_user_code = [line for line in errors if "user_code.py" in line]
    assert not in_user_code, "\n".join(in_user_code)
    # the check is not vacuous: each planted mistake is reported where it was made
    found = {int(line.split(":")[1]): line.rsplit("[", 1)[-1].rstrip("]")
             for line in errors if line.startswith("wrong.py:")}
    assert found == WRONG_ERRORS, "\n".join(errors)


def test_awaited_results_are_typed_even_when_tokenwire_v1_is_unreadable(
        tmp_path: Path) -> None:
    python = _installed_without_typed_v1(tmp_path)
    awaited = tmp_path / "awaited.py"
    awaited.write_text(AWAITED)
    code, errors = _mypy(tmp_path, "[mypy]\nstrict = True\n", "--python-executable",
                         python, awaited)
    assert code == 0, "\n".join(errors)


def test_user_code_uses_every_public_name_and_method() -> None:
    import tokenwire.client as tw

    text = USER_CODE.read_text()
    missing = [name for name in tw.__all__ if not re.search(rf"\b{name}\b", text)]
    for cls in (tw.Client, tw.AsyncClient, tw.TokenStream, tw.AsyncTokenStream,
                tw.Completion, tw.Usage, tw.TokenwireError):
        for name in dir(cls):
            if name.startswith("_") or name in dir(Exception):
                continue
            if not re.search(rf"\.{name}\b", text):
                missing.append(f"{cls.__name__}.{name}")
    assert not missing, f"user_code.py does not use: {missing}"
