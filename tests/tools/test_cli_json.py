"""The README's jq lines read `tokenwire --json` and the pinned grpcurl alike: run as
written (the README's model and address swapped for the test server's), each tokenwire
line prints what the grpcurl line under it prints."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from tests.fakeollama import FakeOllama
from tests.parts import debian_tool
from tests.tools.conftest import ROOT
from tokenwire.service import Runtime

README = (ROOT / "README.md").read_text()


def _jq_block() -> tuple[str, list[str]]:
    """(the `show=` assignment, the command lines) of the README's jq example."""
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", README, flags=re.S) if "| jq" in b]
    lines = block.replace("\\\n", " ").splitlines()
    [assignment] = [line for line in lines if line.startswith("show=")]
    return assignment, [line for line in lines if line.startswith(("tokenwire", "grpcurl"))]


async def test_one_jq_program_reads_tokenwire_and_grpcurl(
        tool_bin: Path, runtime: Runtime, fake: FakeOllama) -> None:
    jq = Path(debian_tool("jq"))
    assignment, commands = _jq_block()
    assert [c.split()[0] for c in commands] == ["tokenwire", "grpcurl"] * 2
    path = os.pathsep.join([str(Path(sys.executable).parent), str(tool_bin), str(jq.parent),
                            os.environ["PATH"]])
    printed = []
    for command in commands:
        command = command.replace("localhost:50051", runtime.target).replace("smollm2:135m",
                                                                             "tiny")
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", f"set -eo pipefail; {assignment}; {command}",
            env=dict(os.environ, PATH=path, TOKENWIRE_TARGET=runtime.target),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (command, err.decode())
        printed.append(out.decode())
    answer, answer_grpcurl, models, models_grpcurl = printed
    completion = len(fake.tokens)
    assert answer == "".join(fake.tokens) + f"\n[{completion} tokens, FINISH_REASON_STOP]\n"
    assert answer_grpcurl == answer
    assert models.splitlines()[0].startswith("tiny:latest ")
    assert models_grpcurl == models
