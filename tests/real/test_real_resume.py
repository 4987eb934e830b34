"""Resumable streams against the real Ollama: a client process killed with SIGKILL
mid-answer, a new process resuming it, and the text compared with Ollama's own answer at
temperature 0; Cancel and the detach grace seen to stop the real model."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.real.conftest import MODEL, MakeRuntime, RealOllama
from tokenwire.client import AsyncClient
from tokenwire.service import Runtime

pytestmark = pytest.mark.real

PROMPT = "Write a long story about a dragon and a knight."
N = 120
OPTIONS = {"num_predict": N, "temperature": 0, "seed": 5}

_READER = textwrap.dedent('''
    import json, sys
    from tokenwire.client import Client
    target, log = sys.argv[1], sys.argv[2]
    options = {"temperature": 0.0, "seed": 5, "max_tokens": %d}
    with Client(target) as client, open(log, "a") as out:
        stream = (client.generate(%r, %r, options=options, resumable=True)
                  if len(sys.argv) == 3 else client.resume(sys.argv[3], int(sys.argv[4])))
        for token in stream:
            out.write(json.dumps({"id": stream.stream_id, "at": stream.position,
                                  "text": token.text, "done": token.done,
                                  "eval": token.usage.completion_tokens}) + "\\n")
            out.flush()
''') % (N, MODEL, PROMPT)


def _lines(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


async def _reader(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _READER, *args, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)


async def test_killed_reader_resumed_by_another_process_equals_ollamas_answer(
        real_runtime: Runtime, ollama_http: httpx.AsyncClient, tmp_path: Path,
        figures: dict[str, str]) -> None:
    reference = (await ollama_http.post("/api/generate", json={
        "model": MODEL, "prompt": PROMPT, "options": OPTIONS, "stream": False})).json()
    log = tmp_path / "tokens.jsonl"
    first = await _reader(real_runtime.target, str(log))
    for _ in range(3000):
        if len(_lines(log)) >= 15:
            break
        await asyncio.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    before = _lines(log)
    assert before and not before[-1]["done"], "the answer ended before the kill"
    last = before[-1]
    killed_at = time.perf_counter()
    second = await _reader(real_runtime.target, str(log), str(last["id"]), str(last["at"]))
    _, err = await second.communicate()
    assert second.returncode == 0, err.decode()
    lines = _lines(log)
    text = "".join(str(line["text"]) for line in lines)
    assert text == reference["response"]  # every chunk once, in order, none lost
    assert lines[-1]["done"] and lines[-1]["eval"] == reference["eval_count"] == N
    figures["resume after SIGKILL of the reader (real Ollama)"] = (
        f"{len(before)} messages before the kill, {len(lines) - len(before)} after; "
        f"new process to end {time.perf_counter() - killed_at:.2f} s")


async def _wait_ollama_idle(real_ollama: RealOllama, offset: int) -> float:
    """Waits for Ollama's log to show the aborted /api/generate request; returns when."""
    for _ in range(500):
        done = [r for r in real_ollama.requests_since(offset) if r.path == "/api/generate"]
        if done:
            return time.perf_counter()
        await asyncio.sleep(0.01)
    raise AssertionError("Ollama never logged the end of the generation")


async def test_cancel_and_detach_grace_stop_the_real_model(
        make_real_runtime: MakeRuntime, real_ollama: RealOllama) -> None:
    runtime = await make_real_runtime(detach_grace=1.0)
    async with AsyncClient(runtime.target) as client:
        options = {"temperature": 0.0, "max_tokens": 4000}
        # Cancel: Ollama logs the request as ended (its runner stops) soon after.
        offset = real_ollama.log_size()
        stream_id = await client.start(MODEL, PROMPT, options=options)
        stream = client.resume(stream_id)
        await stream.__anext__()
        asked = time.perf_counter()
        assert await client.cancel(stream_id)
        ended = await _wait_ollama_idle(real_ollama, offset)
        assert ended - asked < 2.0
        # Detach grace: the reader goes away; 1 s later the model is stopped.
        offset = real_ollama.log_size()
        stream = client.generate(MODEL, PROMPT, options=options, resumable=True)
        await stream.__anext__()
        await stream.aclose()  # leaving is not cancelling
        left = time.perf_counter()
        ended = await _wait_ollama_idle(real_ollama, offset)
        assert 0.9 < ended - left < 4.0
