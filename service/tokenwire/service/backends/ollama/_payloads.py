"""tokenwire requests as Ollama payloads: pure functions, no I/O.

The payload builders expect a request that passed ``_validate``: JSON Schemas given as
text (``Format.json_schema_text``, ``Tool.parameters_text``) were parsed there, once, and
go into the payload as ``orjson.Fragment``s, which the payload encoder copies into the
body as written. So Ollama sees the caller's key order (it builds its grammar in property
order), where a Struct, a map, would come out in an order that changes from one process
to the next.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import orjson
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration

from tokenwire.v1 import generation_pb2 as pb

__all__ = ["chat_payload", "embed_payload", "generate_payload", "struct_to_py"]

#: One JSON object as Ollama takes or gives it.
Payload = dict[str, Any]

# Options fields → Ollama option names (where they differ).
_OPTION_NAMES = {"max_tokens": "num_predict"}
_SCALAR_OPTIONS = tuple(
    f.name for f in pb.Options.DESCRIPTOR.fields if f.name != "stop"
)
_THINK: dict[int, bool | str] = {
    pb.THINK_DISABLED: False,
    pb.THINK_ENABLED: True,
    pb.THINK_LOW: "low",
    pb.THINK_MEDIUM: "medium",
    pb.THINK_HIGH: "high",
}
_ROLES = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}


# -- requests -------------------------------------------------------------------


def struct_to_py(value: struct_pb2.Struct | struct_pb2.Value | struct_pb2.ListValue) -> Any:
    """Struct → plain JSON values; integral numbers become ints (JSON Schema
    keywords such as ``minItems`` must be integers)."""
    if isinstance(value, struct_pb2.Struct):
        return {k: struct_to_py(v) for k, v in value.fields.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [struct_to_py(v) for v in value.values]
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_py(value.struct_value)
    if kind == "list_value":
        return struct_to_py(value.list_value)
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def _options(options: pb.Options) -> dict[str, Any]:
    out: dict[str, Any] = {
        _OPTION_NAMES.get(name, name): getattr(options, name)
        for name in _SCALAR_OPTIONS
        if options.HasField(name)
    }
    if options.stop:
        out["stop"] = list(options.stop)
    return out


def _duration_seconds(d: Duration) -> float:
    return round(d.seconds + d.nanos / 1e9, 3)


def _images(images: Iterable[bytes]) -> list[str]:
    return [base64.b64encode(image).decode("ascii") for image in images]


def _common(request: pb.GenerateRequest | pb.ChatRequest, payload: dict[str, Any]) -> None:
    options = _options(request.options)
    if options:
        payload["options"] = options
    kind = request.format.WhichOneof("kind")
    if kind == "json" and request.format.json:
        payload["format"] = "json"
    elif kind == "json_schema_text":
        payload["format"] = orjson.Fragment(request.format.json_schema_text)
    elif kind == "json_schema":
        payload["format"] = struct_to_py(request.format.json_schema)
    if request.HasField("keep_alive"):
        payload["keep_alive"] = _duration_seconds(request.keep_alive)
    if request.think in _THINK:
        payload["think"] = _THINK[request.think]


def generate_payload(request: pb.GenerateRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": request.model, "prompt": request.prompt, "stream": True}
    if request.system:
        payload["system"] = request.system
    if request.suffix:
        payload["suffix"] = request.suffix
    if request.raw:
        payload["raw"] = True
    if request.images:
        payload["images"] = _images(request.images)
    _common(request, payload)
    return payload


def _tool_call_json(call: pb.ToolCall) -> dict[str, Any]:
    function: dict[str, Any] = {
        "index": call.index,
        "name": call.name,
        # Validated as a JSON object; as text it keeps its key order.
        "arguments": (orjson.Fragment(call.arguments_text) if call.arguments_text
                      else struct_to_py(call.arguments)),
    }
    out: dict[str, Any] = {"function": function}
    if call.id:
        out["id"] = call.id
    return out


def _message_json(message: pb.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": _ROLES[message.role], "content": message.content}
    if message.images:
        out["images"] = _images(message.images)
    if message.tool_calls:
        out["tool_calls"] = [_tool_call_json(call) for call in message.tool_calls]
    if message.tool_name:
        out["tool_name"] = message.tool_name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.thinking:
        out["thinking"] = message.thinking
    return out


def chat_payload(request: pb.ChatRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": request.model,
        "messages": [_message_json(m) for m in request.messages],
        "stream": True,
    }
    if request.tools:
        payload["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": (orjson.Fragment(tool.parameters_text)
                                   if tool.parameters_text
                                   else struct_to_py(tool.parameters)),
                },
            }
            for tool in request.tools
        ]
    _common(request, payload)
    return payload


def embed_payload(request: pb.EmbedRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": request.model, "input": list(request.inputs)}
    if request.HasField("truncate"):
        payload["truncate"] = request.truncate
    if request.HasField("dimensions"):
        payload["dimensions"] = request.dimensions
    if request.HasField("keep_alive"):
        payload["keep_alive"] = _duration_seconds(request.keep_alive)
    return payload
