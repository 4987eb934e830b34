"""The body Ollama receives keeps the caller's key order of a JSON Schema (issue #10):
through the Python client with a dict, through the CLI with a file, and for tool
parameters. Before the fix both went as a ``Struct``, whose order changes per process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fakeollama import FakeOllama
from tests.helpers import last_body, violations
from tokenwire.client import AsyncClient
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

CLI = str(Path(sys.executable).with_name("tokenwire"))
#: Written, alphabetical and reverse orders all differ.
WRITTEN = ["reasoning", "answer", "confidence", "sources", "flag", "count"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string"},
        "answer": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "sources": {"type": "array", "items": {"type": "string"}},
        "flag": {"type": "boolean"},
        "count": {"type": "integer"},
    },
    "required": WRITTEN,
}
PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"unit": {"enum": ["c", "f"]}, "city": {"type": "string"},
                   "days": {"type": "integer"}},
    "required": ["city"],
}


def _request(fake: FakeOllama, path: str) -> Any:
    return [r for r in fake.requests if r.path == path][-1]


async def test_python_client_sends_a_dict_schema_in_its_order(
    runtime: Runtime, fake: FakeOllama
) -> None:
    async with AsyncClient(runtime.target) as client:
        await client.generate_text("tiny", "p", format=SCHEMA)
        body = last_body(fake, "/api/generate")
        assert list(body["format"]["properties"]) == WRITTEN
        assert body["format"] == SCHEMA  # numbers stay integers (minimum 0, not 0.0)
        assert list(body["format"]) == ["type", "properties", "required"]

        await client.complete("tiny", "p", format=SCHEMA)  # the unary RPC too
        assert list(last_body(fake, "/api/generate")["format"]["properties"]) == WRITTEN


async def test_python_client_sends_tool_parameters_in_their_order(
    runtime: Runtime, fake: FakeOllama
) -> None:
    """SmolLM2 cannot use tools in the real Ollama, so the order of tool parameters is
    shown here, on the payload, for both tool spellings the client accepts."""
    tools = [{"name": "weather", "description": "d", "parameters": PARAMETERS},
             {"type": "function", "function": {"name": "w2", "parameters": PARAMETERS}}]
    async with AsyncClient(runtime.target) as client:
        await client.chat_text("tiny", [{"role": "user", "content": "hi"}], tools=tools,
                               format=SCHEMA)
    body = last_body(fake, "/api/chat")
    assert list(body["format"]["properties"]) == WRITTEN
    for tool in body["tools"]:
        assert list(tool["function"]["parameters"]["properties"]) == ["unit", "city", "days"]
        assert tool["function"]["parameters"] == PARAMETERS


async def test_cli_sends_the_schema_file_as_written(runtime: Runtime, fake: FakeOllama,
                                                    tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    text = json.dumps(SCHEMA, indent=2) + "\n"
    schema.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        CLI, "--target", runtime.target, "generate", "-q", "--format", str(schema), "tiny", "p",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "".join(fake.tokens) + "\n"
    request = _request(fake, "/api/generate")
    assert text.encode() in request.raw  # the file's bytes, as written
    assert list(request.body["format"]["properties"]) == WRITTEN


async def test_bad_schema_text_refused_before_ollama(stub: GenerationServiceStub,
                                                     fake: FakeOllama) -> None:
    before = len(fake.requests)
    both = pb.Tool(name="f", parameters={"type": "object"}, parameters_text='{"type": "object"}')
    request = pb.ChatRequest(model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content="x")],
                             format=pb.Format(json_schema_text='{"type": "object"'),
                             tools=[pb.Tool(name="ok", parameters_text="{}"), both])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [t async for t in stub.Chat(request)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in violations(info.value)] == [
        "format.json_schema_text", "tools[1].parameters_text"]
    assert "tools[1].parameters and tools[1].parameters_text" in info.value.details()
    assert not [r for r in fake.requests[before:] if r.path == "/api/chat"]
