"""``tokenwire-server``'s entry point in the dev venv, where the ``server`` extra is
installed: it starts the gateway, and each of its two checks refuses with one line when a
dependency is missing (simulated in a child process: the installed metadata naming a
distribution that is not there, and a source tree without metadata whose import fails)."""

from __future__ import annotations

import os
import subprocess
import sys

from tokenwire._server_entry import (
    GRPC_EXPERIMENTS_DEFAULT,
    INSTALL_HINT,
    missing_server_requirements,
)


def _run(prelude: str, *argv: str) -> subprocess.CompletedProcess[str]:
    code = (prelude + "\nimport sys\nfrom tokenwire._server_entry import main\n"
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=60)


def test_the_dev_venv_has_the_whole_extra() -> None:
    assert missing_server_requirements() == []
    done = _run("", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tokenwire-server")


def test_a_distribution_of_the_extra_missing_from_the_metadata() -> None:
    done = _run(
        "from importlib import metadata\n"
        "requires = metadata.requires\n"
        "metadata.requires = lambda name: [*requires(name),\n"
        "    'no-such-dist>=1; extra == \"server\"', 'other-dist; extra == \"bench\"']\n",
        "--help")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "tokenwire-server: the server's dependencies are not installed (missing: no-such-dist);"
        f" this is the client-only install. For the server: {INSTALL_HINT}\n")


def test_a_source_tree_whose_server_import_fails() -> None:
    done = _run(
        "import sys\nfrom importlib import metadata\n"
        "def requires(name):\n"
        "    raise metadata.PackageNotFoundError(name)\n"
        "metadata.requires = requires\n"
        "sys.modules['orjson'] = None  # import orjson: ModuleNotFoundError\n",
        "--help")
    assert done.returncode == 2
    assert done.stderr == (
        "tokenwire-server: the server's dependencies are not installed (no module named"
        f" 'orjson'); this is the client-only install. For the server: {INSTALL_HINT}\n")


_SHOW_EXPERIMENTS = (
    "import os, tokenwire.service._main as gateway\n"
    "gateway.main = lambda argv: print(repr(os.environ.get('GRPC_EXPERIMENTS'))) or 0\n")


def test_grpc_experiments_default_is_set_before_grpcio_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    done = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom tokenwire._server_entry import main\n"
         "assert 'grpc' not in sys.modules\n" + _SHOW_EXPERIMENTS + "sys.exit(main([]))"],
        capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == repr(GRPC_EXPERIMENTS_DEFAULT) + "\n"


def test_a_users_grpc_experiments_wins_even_empty() -> None:
    for theirs in ("", "-event_engine_listener"):
        done = subprocess.run([sys.executable, "-c", _SHOW_EXPERIMENTS + "import sys\n"
                               "from tokenwire._server_entry import main\nsys.exit(main([]))"],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "GRPC_EXPERIMENTS": theirs})
        assert done.returncode == 0, done.stderr
        assert done.stdout == repr(theirs) + "\n"
