"""A real grpcurl against a live server: reflection only, no proto files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.fakeollama import FakeOllama
from tokenwire.service import Runtime


async def _grpcurl(tool_bin: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(tool_bin / "grpcurl"), "-plaintext", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _json_stream(text: str) -> list[dict[str, object]]:
    decoder, pos, items = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        item, end = decoder.raw_decode(text, pos)
        items.append(item)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return items


async def test_list_and_describe(tool_bin: Path, runtime: Runtime) -> None:
    code, out, err = await _grpcurl(tool_bin, runtime.target, "list")
    assert code == 0, err
    assert {"tokenwire.v1.GenerationService", "grpc.health.v1.Health"} <= set(out.split())
    code, out, err = await _grpcurl(tool_bin, runtime.target, "describe",
                                    "tokenwire.v1.GenerationService")
    assert code == 0, err
    rpc = "rpc Generate ( .tokenwire.v1.GenerateRequest ) returns ( stream .tokenwire.v1.Token )"
    assert rpc in out


async def test_streaming_generate_with_json(tool_bin: Path, runtime: Runtime,
                                            fake: FakeOllama) -> None:
    code, out, err = await _grpcurl(
        tool_bin, "-d", '{"model": "tiny", "prompt": "Why is the sky blue?"}',
        runtime.target, "tokenwire.v1.GenerationService/Generate")
    assert code == 0, err
    messages = _json_stream(out)
    assert "".join(str(m.get("text", "")) for m in messages) == "".join(fake.tokens)
    assert messages[-1]["done"] is True
    assert messages[-1]["finish_reason"] == "FINISH_REASON_STOP"
    assert int(str(messages[-1]["usage"]["completion_tokens"])) == len(fake.tokens)  # type: ignore[index]


async def test_chat_and_health(tool_bin: Path, runtime: Runtime, fake: FakeOllama) -> None:
    body = json.dumps({"model": "tiny", "messages": [
        {"role": "ROLE_USER", "content": "hi"}, {"role": "ROLE_ASSISTANT", "content": "hello"},
        {"role": "ROLE_USER", "content": "bye"}]})
    code, out, err = await _grpcurl(tool_bin, "-d", body, runtime.target,
                                    "tokenwire.v1.GenerationService/Chat")
    assert code == 0, err
    assert _json_stream(out)[-1]["done"] is True
    code, out, err = await _grpcurl(tool_bin, "-d", '{"service": ""}', runtime.target,
                                    "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_error_shows_status_and_details(tool_bin: Path, runtime: Runtime) -> None:
    code, out, err = await _grpcurl(tool_bin, "-d", '{"model": "nope", "prompt": "p"}',
                                    runtime.target, "tokenwire.v1.GenerationService/Generate")
    assert code != 0
    assert "Code: NotFound" in err and "ollama pull nope" in err
