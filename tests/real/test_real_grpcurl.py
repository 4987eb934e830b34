"""A real grpcurl, through tokenwire, to a real Ollama: what a person at a terminal sees."""

from __future__ import annotations

import asyncio
import json
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
