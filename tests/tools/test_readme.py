"""The README's examples run against a live server, so the docs cannot rot."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shlex
from pathlib import Path

from tests.fakeollama import FakeOllama
from tests.tools.conftest import ROOT
from tokenwire.service import Runtime, Settings, parse_settings
from tokenwire.service._health import LIVENESS, READINESS
from tokenwire.service.backends._upstreams import parse_upstreams

README = (ROOT / "README.md").read_text()
MODEL = "smollm2:135m"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _open_quote(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return True
    return False


def _grpcurl_examples() -> list[tuple[list[str], list[str]]]:
    """(argv, the output lines shown under it) for each `$ grpcurl` in the README."""
    examples = []
    for block in _blocks("sh"):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ grpcurl"):
                i += 1
                continue
            command = lines[i][2:]
            while command.endswith("\\") or _open_quote(command):
                i += 1
                command = command.removesuffix("\\") + "\n" + lines[i]
            i += 1
            shown = []
            while i < len(lines) and not lines[i].startswith("$ "):
                if lines[i].strip():
                    shown.append(lines[i])
                i += 1
            examples.append((shlex.split(command), shown))
    return examples


def test_readme_has_grpcurl_examples() -> None:
    verbs = {" ".join(a for a in argv if "/" in a or a in ("list", "describe"))
             for argv, _ in _grpcurl_examples()}
    assert {"list", "tokenwire.v1.GenerationService/Generate",
            "tokenwire.v1.GenerationService/Chat", "grpc.health.v1.Health/Check"} <= {
        v.split()[-1] for v in verbs}


async def test_readme_grpcurl_examples_run(tool_bin: Path, runtime: Runtime,
                                           fake: FakeOllama) -> None:
    # The README uses the demo model; the test Ollama serves "tiny".
    for argv, shown in _grpcurl_examples():
        args = [a.replace("localhost:50051", runtime.target).replace(MODEL, "tiny")
                for a in argv[1:]]
        proc = await asyncio.create_subprocess_exec(
            str(tool_bin / "grpcurl"), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, f"{argv}: {err.decode()}"
        if "list" in args:
            assert out.decode().split() == [s.strip() for s in shown]
        elif "grpc.health.v1.Health/Check" in args or "describe" in args:
            assert out.decode().split() == " ".join(shown).split()


async def test_readme_python_example_runs(runtime: Runtime, fake: FakeOllama) -> None:
    code = _blocks("python")[0]  # the Python client's first example (all run in tests/typing)
    assert "from tokenwire.client import Client" in code
    code = code.replace("127.0.0.1:50051", runtime.target).replace(MODEL, "tiny")
    printed: list[str] = []

    def fake_print(*args: object, **kwargs: object) -> None:
        printed.append(str(kwargs.get("sep", " ")).join(map(str, args)) +
                       str(kwargs.get("end", "\n")))

    await asyncio.to_thread(exec, code, {"print": fake_print})
    output = "".join(printed)
    assert output.startswith("".join(fake.tokens))
    assert f"{len(fake.tokens)} tokens, finish stop, first one after" in output


def test_readme_configuration_table_is_complete() -> None:
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        env = "TOKENWIRE_" + field.name.upper()
        assert f"| `{flag}` | `{env}` |" in README, f"README lacks a row for {flag}"


def test_readme_kubernetes_probes_match_the_flags() -> None:
    """The Kubernetes snippet's arguments are valid flags, and its probes ask the
    --health-listen port for the liveness and readiness names the server serves."""
    (manifest,) = _blocks("yaml")
    args = json.loads(re.search(r"args: (\[.*?\])", manifest, flags=re.S)[1])  # type: ignore[index]
    settings = parse_settings(args, {})
    health_port = int(settings.health_listen.rpartition(":")[2])
    found = re.findall(r"(\w+Probe):\s*\n\s*grpc: \{port: (\d+), service: (\w+)\}", manifest)
    probes = {kind: (int(port), name) for kind, port, name in found}
    assert probes == {"livenessProbe": (health_port, LIVENESS),
                      "readinessProbe": (health_port, READINESS)}


def test_readme_upstreams_example_reads_and_prints_as_shown() -> None:
    """The "Several upstreams" file is a valid upstreams file, and the configuration lines
    shown under it are what the server prints for it."""
    [example] = [b for b in _blocks("toml") if "[upstreams." in b]
    config = parse_upstreams(example, "/etc/tokenwire/upstreams.toml")
    assert [u.name for u in config.upstreams] == ["gpu1", "gpu2", "hosted"]
    assert [t.upstream for t in config.aliases["chat-small"]] == ["gpu1", "gpu2", "hosted"]
    [printed] = [b for b in _blocks("text") if "upstreams from" in b]
    described = config.describe()
    for line in printed.strip().splitlines():
        assert line.strip() in [d.strip() for d in described], line
