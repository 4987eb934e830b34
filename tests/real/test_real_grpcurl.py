"""A real grpcurl, through tokenwire, to a real Ollama: what a person at a terminal sees."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from tests.real.conftest import MODEL
from tokenwire.service import Runtime

pytestmark = pytest.mark.real


async def grpcurl(tool_bin: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(tool_bin / "grpcurl"), "-plaintext", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty-printed JSON object per message."""
    decoder, pos, items = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        item, pos = decoder.raw_decode(text, pos)
        items.append(item)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return items


async def test_grpcurl_streams_a_real_answer(tool_bin: Path, real_runtime: Runtime) -> None:
    target = real_runtime.target
    code, out, err = await grpcurl(tool_bin, target, "list")
    assert code == 0, err
    assert "tokenwire.v1.GenerationService" in out.split()

    code, out, err = await grpcurl(tool_bin, "-d", '{"service": ""}', target,
                                   "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}  # Ollama answers, so: SERVING

    body = {"model": MODEL, "prompt": "Why is the sky blue?",
            "options": {"temperature": 0, "seed": 3, "max_tokens": 8}}
    code, out, err = await grpcurl(tool_bin, "-d", json.dumps(body), target,
                                   "tokenwire.v1.GenerationService/Generate")
    assert code == 0, err
    messages = json_stream(out)
    assert len(messages) >= 3 and "".join(str(m.get("text", "")) for m in messages).strip()
    final = messages[-1]
    assert final["done"] is True and final["finish_reason"] == "FINISH_REASON_LENGTH"
    assert final["model"] == MODEL
    usage = final["usage"]
    assert int(usage["completion_tokens"]) == 8 and int(usage["prompt_tokens"]) > 0
    assert usage["time_to_first_token"].endswith("s") and usage["load_duration"].endswith("s")

    body = {"model": MODEL, "inputs": ["hello"]}
    code, out, err = await grpcurl(tool_bin, "-d", json.dumps(body), target,
                                   "tokenwire.v1.GenerationService/Embed")
    assert code == 0, err
    assert len(json.loads(out)["embeddings"][0]["values"]) == 576


async def test_grpcurl_shows_a_real_upstream_error(tool_bin: Path,
                                                   real_runtime: Runtime) -> None:
    body = {"model": MODEL, "prompt": "hi", "think": "THINK_ENABLED"}
    code, _, err = await grpcurl(tool_bin, "-d", json.dumps(body), real_runtime.target,
                                 "tokenwire.v1.GenerationService/Generate")
    assert code != 0
    assert "Code: InvalidArgument" in err and "does not support thinking" in err


def _readme_generate_example() -> tuple[list[str], dict[str, Any]]:
    """The README's grpcurl Generate call (its argv) and the final message it shows (the
    JSON object holding "done", with its elisions dropped)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
               if "GenerationService/Generate" in b and "$ grpcurl" in b]
    command, _, shown = block.partition("GenerationService/Generate\n")
    argv = shlex.split(command.split("$ grpcurl")[-1].replace("\\\n", " ")
                       + "GenerationService/Generate")
    final_text = shown[shown.rindex("{\n  \"done\": true"):]
    final_text = final_text[:final_text.index("\n}\n") + 3]
    final_text = re.sub(r",\n\s*\.\.\.\n", "\n", final_text)  # "..." stands for more fields
    return argv, json.loads(final_text)


async def test_the_readme_grpcurl_example_shows_what_the_real_model_gives(
        tool_bin: Path, real_runtime: Runtime) -> None:
    """Its figures are one run's, but what does not change from run to run (the prompt's
    token count, the model, the fields shown) is what this model gives. (The answer is cut
    at 8 tokens: unbounded, it can run for minutes on busy cores.)"""
    argv, shown = _readme_generate_example()
    assert argv[0] == "-plaintext" and argv[1] == "-d" and "localhost:50051" in argv
    body = json.loads(argv[2]) | {"options": {"max_tokens": 8}}
    args = ["-d", json.dumps(body),
            *(a.replace("localhost:50051", real_runtime.target) for a in argv[3:])]
    code, out, err = await grpcurl(tool_bin, *args)
    assert code == 0, err
    final = json_stream(out)[-1]
    assert final["usage"]["prompt_tokens"] == shown["usage"]["prompt_tokens"]
    assert final["model"] == shown["model"]
    assert final["finish_reason"] in (shown["finish_reason"], "FINISH_REASON_LENGTH")
    assert set(shown) <= set(final) and set(shown["usage"]) <= set(final["usage"])
