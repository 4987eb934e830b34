"""The ``tokenwire`` command as a shell runs it: the installed console script in a child
process, against the real server and the test Ollama."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakeollama import FakeOllama
from tokenwire.client._cli import _parser
from tokenwire.service import Runtime, Settings, parse_settings

BIN = Path(sys.executable).parent
CLI = str(BIN / "tokenwire")


async def _run(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    assert "Traceback" not in err.decode(), err.decode()
    return proc.returncode, out.decode(), err.decode()


async def test_options_after_the_command(runtime: Runtime, fake: FakeOllama) -> None:
    code, out, err = await _run(CLI, "generate", "--target", runtime.target, "tiny", "Why?")
    assert (code, out) == (0, "".join(fake.tokens) + "\n"), err
    code, out, err = await _run(CLI, "models", "--target", runtime.target, "--json")
    assert code == 0 and '"name": "tiny:latest"' in out, err


@pytest.mark.parametrize("command", ["tokenwire", "tokenwire-server"])
async def test_version(command: str) -> None:
    version = importlib.metadata.version("tokenwire")
    assert await _run(str(BIN / command), "--version") == (0, f"{command} {version}\n", "")


async def test_empty_prompt_is_a_usage_error_and_load_does_it_on_purpose(
        runtime: Runtime, fake: FakeOllama) -> None:
    def generations() -> int:
        return sum(r.path == "/api/generate" for r in fake.requests)

    calls = generations()
    code, out, err = await _run(CLI, "--target", runtime.target, "generate", "tiny")
    assert (code, out) == (2, "")  # empty stdin
    assert "error: the prompt on stdin is empty" in err and "tokenwire load tiny" in err
    assert generations() == calls  # nothing reached the engine
    fake.loaded.clear()
    assert await _run(CLI, "--target", runtime.target, "load", "tiny") == (
        0, "loaded tiny\n", "")
    assert fake.loaded == ["tiny:latest"]
    code, out, _ = await _run(CLI, "unload", "--target", runtime.target, "--json", "tiny")
    assert code == 0 and '"finish_reason": "FINISH_REASON_UNLOAD"' in out
    assert fake.loaded == []


@pytest.mark.parametrize("json_lines", [False, True])
async def test_a_closed_pipe_ends_quietly_and_cancels_the_call(
        runtime: Runtime, fake: FakeOllama, json_lines: bool) -> None:
    """`tokenwire generate ... | head -1`: the CLI ends as a process killed by SIGPIPE
    shows in the shell (141), with no traceback, and the model is stopped."""
    fake.tokens = [f"line {i}\n" for i in range(200)]
    fake.token_delay = 0.05  # 10 s in all: still generating when head has gone
    json_flag = "--json" if json_lines else ""
    script = (f'"$0" --target {runtime.target} generate {json_flag} tiny Why '
              '| head -1; echo "status ${PIPESTATUS[0]}"')
    _, out, err = await _run("bash", "-c", script, CLI)
    first, status = out.splitlines()
    assert "line 0" in first
    assert status == "status 141"
    assert err == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    await fake.wait_for_disconnect(timeout=5)  # the gateway cancelled the upstream call
    assert not fake.streams[-1].completed


def _help(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return " ".join(done.stdout.split())  # argparse wraps lines; a value never spans two


_UNTYPEABLE = re.compile(r"default:? (?:[\]\);,]|False\b|True\b|None\b)")


def test_every_help_shows_defaults_one_can_type() -> None:
    """No `default ]`, `default False` or `default None` in any --help of either command,
    and every server flag's shown default, typed back, gives that default."""
    commands = next(a for a in _parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert {"generate", "chat", "load", "models"} <= set(commands)
    for argv in [[CLI], *([CLI, name] for name in commands)]:
        text = _help(*argv, "--help")
        assert not _UNTYPEABLE.search(text), (argv, _UNTYPEABLE.search(text))
    text = _help(str(BIN / "tokenwire-server"), "--help")
    assert not _UNTYPEABLE.search(text), _UNTYPEABLE.search(text)
    shown = dict(re.findall(r"\[env TOKENWIRE_(\w+); default (\S*)\]", text))
    defaults = Settings()
    assert set(shown) == {f.name.upper() for f in dataclasses.fields(Settings)}
    for field in dataclasses.fields(Settings):
        value = shown[field.name.upper()]
        flag = "--" + field.name.replace("_", "-")
        argv = [value] if value.startswith("--") else [flag, *shlex.split(value)]
        typed = parse_settings(argv, {})
        assert getattr(typed, field.name) == getattr(defaults, field.name), (argv, typed)


async def test_server_on_a_port_in_use_says_so_in_one_line(fake: FakeOllama) -> None:
    """`tokenwire-server --listen ADDR` with ADDR held by another process: exit 2 and one
    line that names the address and the process, no traceback, nothing else."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import socket, sys\n"
        "s = socket.create_server(('127.0.0.1', 0))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "sys.stdin.read()\n",  # holds the port until its stdin closes
        "--redis-url=redis://:s3cret@127.0.0.1:6379",  # a command line can carry a password
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        port = int(await asyncio.wait_for(holder.stdout.readline(), 30))
        for flag in ("--listen", "--metrics-listen"):
            code, out, err = await _run(str(BIN / "tokenwire-server"), "--ollama-url", fake.url,
                                        "--listen", "127.0.0.1:0", flag, f"127.0.0.1:{port}")
            assert (code, out) == (2, ""), err
            line, = err.splitlines()
            name = await asyncio.to_thread(Path(f"/proc/{holder.pid}/comm").read_text)
            name = name.strip()
            assert line.startswith(
                f"tokenwire-server: error: cannot listen on 127.0.0.1:{port} ({flag}): the "
                f"address is in use by pid {holder.pid} ({name});")
            assert "s3cret" not in line  # the holder's name only, never its arguments
            assert line.endswith("; stop that process or choose another port")
    finally:
        holder.stdin.close()
        await holder.wait()
