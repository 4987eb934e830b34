"""``tokenwire-server``'s entry point in the dev venv, where the ``server`` extra is
installed: it starts the gateway, and each of its two checks refuses with one line when a
dependency is missing (simulated in a child process: the installed metadata naming a
distribution that is not there, and a source tree without metadata whose import fails)."""

from __future__ import annotations

import subprocess
import sys

from tokenwire._server_entry import INSTALL_HINT, missing_server_requirements


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
