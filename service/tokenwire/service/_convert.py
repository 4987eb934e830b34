"""Pure conversions between tokenwire messages and Ollama's JSON.

No I/O here: requests become Ollama payloads, Ollama chunks become pieces of
Tokens, final chunks become Usage.

The payload builders expect a request that passed ``_validate``: JSON Schemas given as
text (``Format.json_schema_text``, ``Tool.parameters_text``) were parsed there, once, and
go into the payload as ``orjson.Fragment``s, which the payload encoder copies into the
body as written. So Ollama sees the caller's key order (it builds its grammar in property
order), where a Struct, a map, would come out in an order that changes with the hash seed
of the process.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tokenwire.v1 import generation_pb2 as pb

from ._upstream import Chunk

__all__ = [
    "chat_payload",
    "embed_payload",
    "finish_reason",
    "generate_payload",
    "model_from_tag",
    "struct_to_py",
    "tool_calls_from",
    "usage_from",
]

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
_FINISH: dict[str, pb.FinishReason] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "load": pb.FINISH_REASON_LOAD,
    "unload": pb.FINISH_REASON_UNLOAD,
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
        "arguments": struct_to_py(call.arguments),
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


# -- responses ------------------------------------------------------------------


def tool_calls_from(raw: Sequence[dict[str, Any]]) -> list[pb.ToolCall]:
    calls = []
    for position, item in enumerate(raw):
        function = item.get("function") or {}
        call = pb.ToolCall(
            id=str(item.get("id") or ""),
            name=str(function.get("name") or ""),
            index=int(function.get("index", position) or 0),
        )
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            call.arguments.update(arguments)
        calls.append(call)
    return calls


def finish_reason(done_reason: str) -> pb.FinishReason:
    return _FINISH.get(done_reason, pb.FINISH_REASON_OTHER)


def _ns(chunk: Chunk, key: str) -> Duration:
    d = Duration()
    value = chunk.get(key)
    if isinstance(value, int):
        d.FromNanoseconds(value)
    return d


def usage_from(chunk: Chunk) -> pb.Usage:
    """Usage from Ollama's final chunk (the gateway's own figures are added later)."""
    eval_count = int(chunk.get("eval_count") or 0)
    eval_ns = int(chunk.get("eval_duration") or 0)
    return pb.Usage(
        prompt_tokens=int(chunk.get("prompt_eval_count") or 0),
        completion_tokens=eval_count,
        total_duration=_ns(chunk, "total_duration"),
        load_duration=_ns(chunk, "load_duration"),
        prompt_eval_duration=_ns(chunk, "prompt_eval_duration"),
        eval_duration=_ns(chunk, "eval_duration"),
        eval_tokens_per_second=eval_count * 1e9 / eval_ns if eval_ns > 0 else 0.0,
        engine_finish_reason=str(chunk.get("done_reason") or ""),
    )


def model_from_tag(tag: dict[str, Any]) -> pb.Model:
    details = tag.get("details") or {}
    model = pb.Model(
        name=str(tag.get("name") or tag.get("model") or ""),
        size_bytes=int(tag.get("size") or 0),
        digest=str(tag.get("digest") or ""),
        format=str(details.get("format") or ""),
        family=str(details.get("family") or ""),
        parameter_size=str(details.get("parameter_size") or ""),
        quantization_level=str(details.get("quantization_level") or ""),
    )
    modified = tag.get("modified_at")
    if isinstance(modified, str) and modified:
        model.modified_at.CopyFrom(_timestamp(modified))
    return model


def _timestamp(text: str) -> Timestamp:
    ts = Timestamp()
    try:
        ts.FromJsonString(text)
    except ValueError:
        # Go writes local offsets (e.g. "+02:00") and up to 9 fraction digits;
        # fall back to datetime, which handles offsets (microsecond precision).
        try:
            ts.FromDatetime(datetime.fromisoformat(text))
        except ValueError:
            pass
    return ts
