"""JSON Schemas given as text reach Ollama with the caller's key order (issue #10).

Ollama builds its grammar in property order, so the order of the payload's keys decides
the order of the keys in the answer. A ``Struct`` is a map: the order its keys come out in
changes from one process to the next (upb seeds its hash tables per process), so only the
text fields can keep it. These tests read the encoded payload (the bytes the upstream
adapter sends), and run the conversion in separate processes with different
``PYTHONHASHSEED`` values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import orjson

from tokenwire.service.backends.ollama._payloads import chat_payload, generate_payload
from tokenwire.v1 import generation_pb2 as pb

#: Written order differs from the alphabetical and from the reverse order, at every level.
SCHEMA_TEXT = (
    '{"type": "object", "properties": {"reasoning": {"type": "string"}, '
    '"answer": {"type": "string", "maxLength": 40}, "confidence": {"type": "number"}, '
    '"sources": {"type": "array", "items": {"type": "string"}}, "flag": {"type": "boolean"}, '
    '"count": {"type": "integer", "minimum": 0}}, '
    '"required": ["reasoning", "answer", "confidence", "sources", "flag", "count"]}'
)
WRITTEN = ["reasoning", "answer", "confidence", "sources", "flag", "count"]
TOOL_TEXT = ('{"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, '
             '"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}')
TOOL_WRITTEN = ["unit", "city", "days"]


def _sent(payload: dict[str, Any]) -> Any:
    """The payload as Ollama receives it: encoded as the upstream adapter does, then read."""
    return orjson.loads(orjson.dumps(payload))


def test_format_text_goes_out_as_written() -> None:
    request = pb.GenerateRequest(model="m", prompt="p",
                                 format=pb.Format(json_schema_text=SCHEMA_TEXT))
    body = orjson.dumps(generate_payload(request))
    assert SCHEMA_TEXT.encode() in body  # byte for byte: no re-serialisation
    sent = orjson.loads(body)
    assert list(sent["format"]) == ["type", "properties", "required"]
    assert list(sent["format"]["properties"]) == WRITTEN
    assert (sent["model"], sent["prompt"], sent["stream"]) == ("m", "p", True)


def test_chat_format_and_tool_parameters_text_keep_order() -> None:
    struct_tool = pb.Tool(name="old", parameters={"type": "object"})
    request = pb.ChatRequest(
        model="m", messages=[pb.Message(role=pb.ROLE_USER, content="hi")],
        format=pb.Format(json_schema_text=SCHEMA_TEXT),
        tools=[pb.Tool(name="weather", description="d", parameters_text=TOOL_TEXT),
               struct_tool, pb.Tool(name="none")],
    )
    sent = _sent(chat_payload(request))
    assert list(sent["format"]["properties"]) == WRITTEN
    functions = [tool["function"] for tool in sent["tools"]]
    assert list(functions[0]["parameters"]["properties"]) == TOOL_WRITTEN
    assert list(functions[0]["parameters"]) == ["type", "properties", "required"]
    assert functions[1]["parameters"] == {"type": "object"}  # a Struct is still accepted
    assert functions[2]["parameters"] == {}  # neither set: an empty schema, as before


_CHILD = """
import sys, orjson
from tokenwire.service.backends.ollama._payloads import chat_payload
from tokenwire.v1 import generation_pb2 as pb
request = pb.ChatRequest.FromString(sys.stdin.buffer.read())  # as it comes off the wire
sent = orjson.loads(orjson.dumps(chat_payload(request)))
print(orjson.dumps({
    "format": list(sent["format"]["properties"]),
    "text_tool": list(sent["tools"][0]["function"]["parameters"]["properties"]),
    "struct_tool": list(sent["tools"][1]["function"]["parameters"]["properties"]),
}).decode())
"""


def test_order_is_the_same_in_every_process_whatever_the_hash_seed() -> None:
    properties = {name: {"type": "string"} for name in WRITTEN}
    struct_tool = pb.Tool(name="struct")
    struct_tool.parameters.update({"type": "object", "properties": properties})
    request = pb.ChatRequest(
        model="m", messages=[pb.Message(role=pb.ROLE_USER, content="hi")],
        format=pb.Format(json_schema_text=SCHEMA_TEXT),
        tools=[pb.Tool(name="text", parameters_text=TOOL_TEXT), struct_tool],
    ).SerializeToString()
    seen = []
    for seed in ("0", "1", "2", "3", "42", "4242", "random", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", _CHILD], input=request, env=env,
                                capture_output=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr.decode()
        seen.append(orjson.loads(result.stdout))
    assert [s["format"] for s in seen] == [WRITTEN] * len(seen)
    assert [s["text_tool"] for s in seen] == [TOOL_WRITTEN] * len(seen)
    # The control: the same harness does see a Struct's order change between processes
    # (what the text fields fix). If protobuf ever keeps map order, this line says so.
    struct_orders = {tuple(s["struct_tool"]) for s in seen}
    assert len(struct_orders) > 1, f"a Struct kept one order in 8 processes: {struct_orders}"
