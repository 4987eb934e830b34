"""The README's Python snippets: each is in user_code.py (so mypy --strict checks it) and
runs, as a user runs it, against the gateway in front of the test Ollama."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import FAST, runtimes
from tests.fakeollama import DEFAULT_TOKENS, FakeOllama, Fault
from tests.helpers import last_body
from tokenwire.service import Runtime

ROOT = Path(__file__).resolve().parents[2]
USER_CODE = Path(__file__).with_name("user_code.py")
SECTIONS = ("## Python client", "## Coming from ollama-python or openai-python")
README_TARGET = "127.0.0.1:50051"
ANSWER = "".join(DEFAULT_TOKENS)


def readme_snippets() -> dict[str, str]:
    """The tokenwire Python blocks of SECTIONS, keyed by the user_code.py function that
    holds each one."""
    readme = (ROOT / "README.md").read_text()
    user_code = USER_CODE.read_text()
    found: dict[str, str] = {}
    for title in SECTIONS:
        start = readme.index(f"\n{title}\n")
        section = readme[start:readme.index("\n## ", start + 1)]
        for block in re.findall(r"```python\n(.*?)```", section, re.S):
            if "from tokenwire.client import" not in block:
                continue  # an ollama-python or openai-python block
            body = textwrap.indent(block, "    ", lambda line: bool(line.strip()))
            match = re.search(r"def (readme_\w+)\(\) -> None:\n" + re.escape(body), user_code)
            assert match, f"README block not in user_code.py verbatim:\n{block}"
            found[match[1]] = block
    return found


def test_every_tokenwire_snippet_is_in_user_code_verbatim() -> None:
    snippets = readme_snippets()
    assert len(snippets) == 7, sorted(snippets)
    # and user_code.py holds no stale snippet the README has dropped
    assert set(snippets) == set(re.findall(r"def (readme_\w+)\(", USER_CODE.read_text()))


@pytest.fixture
async def engine() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=("smollm2:135m",), token_delay=0.02) as fake:
        yield fake


@pytest.fixture
async def gateway(engine: FakeOllama) -> AsyncIterator[Runtime]:
    async with runtimes(replace(FAST, ollama_url=engine.url)) as make:
        yield await make()


async def _python(target: str, *args: str) -> str:
    """Runs a Python process as a user would (TOKENWIRE_TARGET set); returns its stdout."""
    env = {**os.environ, "TOKENWIRE_TARGET": target}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert not err, err.decode()
    return out.decode()


async def _snippet(gateway: Runtime, name: str) -> str:
    code = readme_snippets()[name].replace(README_TARGET, gateway.target)
    return await _python(gateway.target, "-c", code)


async def test_streaming_snippets_print_the_answer_and_its_figures(gateway: Runtime) -> None:
    out = await _snippet(gateway, "readme_python_client")
    assert re.fullmatch(re.escape(ANSWER) + r"\n12 tokens, finish stop, first one after "
                        r"\d+\.\d{3} s\n", out), out
    assert await _snippet(gateway, "readme_stream_a_completion") == ANSWER
    out = await _snippet(gateway, "readme_asyncio")
    assert out == f"{ANSWER}\n12 tokens, finish stop\n"


async def test_chat_and_complete_snippets(gateway: Runtime, engine: FakeOllama) -> None:
    assert await _snippet(gateway, "readme_chat_with_history") == f"{ANSWER}\n{ANSWER}\n"
    second = last_body(engine, "/api/chat")["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == ANSWER
    out = await _snippet(gateway, "readme_one_answer")
    assert re.fullmatch(re.escape(ANSWER) + r" stop 12 \d+\.\d+(e-\d+)?\n", out), out
    assert last_body(engine, "/api/generate")["options"]["num_predict"] == 50


async def test_cancellation_snippet_stops_the_engine(gateway: Runtime,
                                                     engine: FakeOllama) -> None:
    engine.token_delay = 0.2  # the rest of the answer would take 1.4 s: time to see the cancel
    out = await _snippet(gateway, "readme_cancellation")
    assert len(out) >= 20 and ANSWER.startswith(out) and out != ANSWER
    await engine.wait_for_disconnect()
    assert not engine.streams[-1].completed


async def test_failure_snippet_keeps_the_text_that_arrived(gateway: Runtime,
                                                           engine: FakeOllama) -> None:
    assert await _snippet(gateway, "readme_deadlines_and_failures") == ANSWER
    engine.set_fault(Fault(drop_after=3, times=1))
    out = await _snippet(gateway, "readme_deadlines_and_failures")
    kept = "".join(DEFAULT_TOKENS[:3])
    assert out.startswith(kept + "\n[UNAVAILABLE: ") and out.endswith(f"kept: {kept!r}]\n"), out


async def test_failure_snippet_on_its_deadline(gateway: Runtime, engine: FakeOllama) -> None:
    engine.set_fault(Fault(hang_after=3, times=1))
    out = await _snippet(gateway, "readme_deadlines_and_failures")
    kept = "".join(DEFAULT_TOKENS[:3])
    assert out == f"{kept}\n[5 s passed; {len(kept)} characters had arrived]\n"
    await engine.wait_for_disconnect()  # the gateway closed the engine's request
    assert not engine.streams[-1].completed


async def test_user_code_runs_against_the_gateway(gateway: Runtime) -> None:
    out = await _python(gateway.target, str(USER_CODE), gateway.target)
    assert "pull no-such-model first" in out
