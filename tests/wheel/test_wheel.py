"""The client alone, as a user installs it: tokenwire's wheel built from this tree and
installed without extras into a fresh venv (its dependencies from the package index).

Checked there: none of the gateway's dependencies came with it; the installed ``tokenwire``
CLI and a user's script (``user_stream.py``) stream from a tokenwire server (run by the test
from the dev venv, over the test Ollama); ``tokenwire-server`` says in one line to install
the ``server`` extra and exits 2; and ``mypy --strict`` passes on
``tests/typing/user_code.py`` from the installed wheel alone (run outside the repository, so
the source tree is not on any path), while the same wheel without ``tokenwire/v1/py.typed``
fails it with ``import-untyped``.

The wheel is built once per session (pip wheel --no-deps: hatchling, as pip builds it) and
the venv made once (``--without-pip``; the dev venv's pip installs into it with
``--python``); pip's own cache makes a second run quick.
"""

from __future__ import annotations

import asyncio
import email
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from tests.fakeollama import DEFAULT_TOKENS
from tokenwire._server_entry import INSTALL_HINT
from tokenwire.service import Runtime

pytestmark = pytest.mark.timeout(600)  # a cold pip cache downloads grpcio, protobuf, mypy

ROOT = Path(__file__).resolve().parents[2]
USER_CODE = ROOT / "tests" / "typing" / "user_code.py"
USER_STREAM = Path(__file__).with_name("user_stream.py")
ANSWER = "".join(DEFAULT_TOKENS)
# The gateway's dependencies the issue names, by import name: none may come with the client.
SERVER_ONLY_MODULES = ("httpx", "orjson", "uvloop", "prometheus_client", "grpc_reflection",
                       "grpc_status", "redis", "hiredis", "msgspec", "httptools")


def _env() -> dict[str, str]:
    """The environment of a user's shell: nothing that points Python at this tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MYPYPATH")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check",
                    *args], check=True, env=_env())


@dataclass(frozen=True)
class ClientVenv:
    wheel: Path
    root: Path
    work: Path  # the cwd of everything run in the venv: outside the repository

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def install(self, *requirements: str) -> None:
        _pip("--python", self.python, "install", *requirements)

    def site_packages(self) -> Path:
        out = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], check=True, capture_output=True, text=True,
                             cwd=self.work, env=_env())
        return Path(out.stdout.strip())

    async def run(self, *argv: str) -> tuple[int, str, str]:
        """Runs a program of the venv without blocking the loop the test's server runs in."""
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=self.work, env=_env(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--wheel-dir", str(out), str(ROOT))
    (built,) = out.glob("tokenwire-*.whl")
    return built


@pytest.fixture(scope="session")
def client_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    base = tmp_path_factory.mktemp("client-venv")
    venv = ClientVenv(wheel, base / "venv", base / "work")
    venv.work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv.root)], check=True,
                   env=_env())
    venv.install(str(wheel))
    return venv


def test_wheel_carries_the_stubs_and_typed_markers(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("tokenwire/client/py.typed", "tokenwire/v1/py.typed",
                 "tokenwire/v1/generation_pb2.pyi", "tokenwire/v1/generation_pb2.py",
                 "tokenwire/v1/generation_pb2_grpc.py", "tokenwire/client/service_config.json",
                 "tokenwire/_server_entry.py"):
        assert name in names, f"{name} is not in {wheel.name}"


def test_the_client_installs_without_the_gateways_dependencies(client_venv: ClientVenv) -> None:
    probe = ("import importlib.util as u, json, sys; "
             "print(json.dumps({m: u.find_spec(m) is not None for m in sys.argv[1:]}))")
    wanted = ("grpc", "google.protobuf", "google.rpc.status_pb2", "grpc_health.v1.health_pb2",
              "tokenwire.client", "tokenwire.v1.generation_pb2")
    out = subprocess.run([client_venv.python, "-c", probe, *wanted, *SERVER_ONLY_MODULES],
                         check=True, capture_output=True, text=True, cwd=client_venv.work,
                         env=_env())
    found = json.loads(out.stdout)
    assert [m for m in wanted if not found[m]] == []
    assert [m for m in SERVER_ONLY_MODULES if found[m]] == []
    # Every distribution the wheel's metadata puts in the `server` extra is absent too.
    with zipfile.ZipFile(client_venv.wheel) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        declared = email.message_from_bytes(whl.read(name)).get_all("Requires-Dist") or []
    server = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower()
              for r in declared if r.endswith("extra == 'server'")}
    assert {"httpx", "orjson", "prometheus-client", "grpcio-reflection"} <= server
    listed = subprocess.run([client_venv.python, "-c",
                             "import importlib.metadata as m; print(*(d.metadata['Name'] "
                             "for d in m.distributions()))"],
                            check=True, capture_output=True, text=True, cwd=client_venv.work,
                            env=_env()).stdout.lower().split()
    assert "tokenwire" in listed and "grpcio" in listed
    assert server & set(listed) == set()


async def test_installed_cli_and_user_code_stream_from_a_server(
    client_venv: ClientVenv, runtime: Runtime
) -> None:
    code, out, err = await client_venv.run(client_venv.bin("tokenwire"), "--target",
                                           runtime.target, "generate", "tiny:latest", "Hello")
    assert code == 0, err
    assert out.strip() == ANSWER
    assert "Traceback" not in err

    code, out, err = await client_venv.run(client_venv.bin("tokenwire"), "--target",
                                           runtime.target, "health")
    assert code == 0, err

    script = client_venv.work / USER_STREAM.name
    shutil.copy(USER_STREAM, script)
    code, out, err = await client_venv.run(client_venv.python, str(script), runtime.target,
                                           "tiny:latest", "Why is the sky blue?")
    assert code == 0, err
    # The sync stream, the async stream and the unary Complete each print the answer.
    assert out.splitlines() == [ANSWER, ANSWER, ANSWER,
                                "embedder:latest think-model:latest tiny:latest"]
    assert err == f"{len(DEFAULT_TOKENS)} tokens\n"


@pytest.mark.parametrize("argv", [(), ("--help",), ("--listen", "127.0.0.1:0")])
async def test_server_without_its_extra_says_what_to_install(
    client_venv: ClientVenv, argv: tuple[str, ...]
) -> None:
    code, out, err = await client_venv.run(client_venv.bin("tokenwire-server"), *argv)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert INSTALL_HINT in err and "missing: " in err and "httpx" in err
    # The README's Installing section shows this line as it is.
    readme = (ROOT / "README.md").read_text()
    assert "$ tokenwire-server\n" + err in readme


async def test_mypy_strict_on_user_code_from_the_installed_wheel(client_venv: ClientVenv) -> None:
    # The dev venv's versions, so that a new mypy release cannot change the verdict unseen;
    # types-protobuf gives the protobuf classes (Duration, Struct) their types, as a user
    # running mypy installs it.
    client_venv.install(*(f"{name}=={metadata.version(name)}"
                          for name in ("mypy", "types-protobuf")))
    shutil.copy(USER_CODE, client_venv.work / "user_code.py")
    mypy = (client_venv.python, "-m", "mypy", "--strict", "--no-incremental",
            "--no-error-summary", "user_code.py")

    code, out, err = await client_venv.run(*mypy)
    assert (code, out, err) == (0, "", "")

    # The control: without the stubs' py.typed marker the same run fails as the issue said.
    marker = client_venv.site_packages() / "tokenwire" / "v1" / "py.typed"
    moved = marker.with_name("py.typed.moved")
    marker.rename(moved)
    try:
        code, out, err = await client_venv.run(*mypy)
    finally:
        moved.rename(marker)
    assert code == 1
    assert 'Skipping analyzing "tokenwire.v1"' in out and "[import-untyped]" in out
