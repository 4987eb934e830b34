"""Pure conversions between tokenwire messages and Ollama's JSON.

No I/O here: requests become Ollama payloads, Ollama chunks become pieces of
Tokens, final chunks become Usage.

What comes from the upstream is checked as it is converted: a count that is not a
whole number from 0 to 2**32-1, a duration that is not whole nanoseconds from 0 to
2**63-1, or a field of the wrong type raises ProtocolError (naming the field),
never a TypeError or ValueError that would end the call as INTERNAL.

The payload builders expect a request that passed ``_validate``: JSON Schemas given as
text (``Format.json_schema_text``, ``Tool.parameters_text``) were parsed there, once, and
go into the payload as ``orjson.Fragment``s, which the payload encoder copies into the
body as written. So Ollama sees the caller's key order (it builds its grammar in property
order), where a Struct, a map, would come out in an order that changes from one process
to the next.
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

from ..._exceptions import ProtocolError
from ._adapter import Chunk

__all__ = [
    "chat_payload",
    "embed_response",
    "embed_payload",
    "finish_reason",
    "generate_payload",
    "model_from_tag",
    "model_name",
    "models_from_tags",
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
    if not isinstance(raw, list):
        raise ProtocolError(f"Ollama sent tool_calls={_shown(raw)}, which is not a list")
    calls = []
    for position, item in enumerate(raw):
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            raise ProtocolError(f"Ollama sent tool call {position} without a function object")
        call = pb.ToolCall(
            id=_name(item, "id"),
            name=_name(function, "name"),
            index=_count(function, "index") if "index" in function else position,
        )
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            call.arguments.update(arguments)
        elif arguments is not None:
            raise ProtocolError(f"Ollama sent arguments of tool call {position} that are not "
                                "a JSON object")
        calls.append(call)
    return calls


def finish_reason(done_reason: str) -> pb.FinishReason:
    return _FINISH.get(done_reason, pb.FINISH_REASON_OTHER)


_UINT32 = 2**32 - 1
_UINT64 = 2**64 - 1
_INT64 = 2**63 - 1
#: Longest name (model, digest, ...) taken from the upstream, in characters.
_MAX_NAME = 1024


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(chunk: Chunk, key: str, highest: int, what: str) -> int:
    value = chunk.get(key)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is int and 0 <= value <= highest:
        return value
    raise ProtocolError(f"Ollama sent {key}={_shown(value)}, which is not {what} "
                        f"(a whole number from 0 to {highest})")


def _count(chunk: Chunk, key: str, highest: int = _UINT32) -> int:
    return _whole(chunk, key, highest, "a count")


def _ns(chunk: Chunk, key: str) -> Duration:
    d = Duration()
    d.FromNanoseconds(_whole(chunk, key, _INT64, "a duration in nanoseconds"))
    return d


def _name(chunk: Chunk, key: str) -> str:
    value = chunk.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > _MAX_NAME:
        raise ProtocolError(f"Ollama sent {key}={_shown(value)}, which is not a name "
                            f"(a string of at most {_MAX_NAME} characters)")
    return value


def usage_from(chunk: Chunk) -> pb.Usage:
    """Usage from Ollama's final chunk (the gateway's own figures are added later).
    Raises ProtocolError for a count or duration out of range or of the wrong type."""
    eval_count = _count(chunk, "eval_count")
    eval_ns = _whole(chunk, "eval_duration", _INT64, "a duration in nanoseconds")
    return pb.Usage(
        prompt_tokens=_count(chunk, "prompt_eval_count"),
        completion_tokens=eval_count,
        total_duration=_ns(chunk, "total_duration"),
        load_duration=_ns(chunk, "load_duration"),
        prompt_eval_duration=_ns(chunk, "prompt_eval_duration"),
        eval_duration=_ns(chunk, "eval_duration"),
        eval_tokens_per_second=eval_count * 1e9 / eval_ns if eval_ns > 0 else 0.0,
        engine_finish_reason=_name(chunk, "done_reason"),
    )


def model_name(chunk: Chunk, default: str) -> str:
    """The model an answer names (Ollama's ``model``), else ``default``."""
    return _name(chunk, "model") or default


def model_from_tag(tag: dict[str, Any]) -> pb.Model:
    details = tag.get("details") or {}
    if not isinstance(details, dict):
        raise ProtocolError(f"Ollama sent details={_shown(details)}, which is not an object")
    model = pb.Model(
        name=_name(tag, "name") or _name(tag, "model"),
        size_bytes=_count(tag, "size", _UINT64),
        digest=_name(tag, "digest"),
        format=_name(details, "format"),
        family=_name(details, "family"),
        parameter_size=_name(details, "parameter_size"),
        quantization_level=_name(details, "quantization_level"),
    )
    modified = tag.get("modified_at")
    if isinstance(modified, str) and modified:
        model.modified_at.CopyFrom(_timestamp(modified))
    return model


def models_from_tags(body: Chunk) -> list[pb.Model]:
    """The models of an /api/tags answer."""
    tags = body.get("models")
    if not isinstance(tags, list):
        raise ProtocolError("Ollama's /api/tags answer has no models list")
    return [model_from_tag(t) for t in tags if isinstance(t, dict)]


def embed_response(body: Chunk, model: str) -> pb.EmbedResponse:
    """An /api/embed answer as an EmbedResponse."""
    vectors = body.get("embeddings")
    if not isinstance(vectors, list):
        raise ProtocolError("Ollama's /api/embed answer has no embeddings list")
    embeddings = []
    for i, vector in enumerate(vectors):
        if not isinstance(vector, list) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
            raise ProtocolError(f"Ollama's embedding {i} is not a list of numbers")
        embeddings.append(pb.Embedding(values=vector))
    usage = usage_from(body)
    return pb.EmbedResponse(
        embeddings=embeddings,
        model=model_name(body, model),
        prompt_tokens=usage.prompt_tokens,
        total_duration=usage.total_duration,
        load_duration=usage.load_duration,
    )


def _timestamp(text: str) -> Timestamp:
    ts = Timestamp()
    try:
        ts.FromJsonString(text)
    except ValueError:
        # Go writes local offsets (e.g. "+02:00") and up to 9 fraction digits;
        # fall back to datetime, which handles offsets (microsecond precision).
        try:
            ts.FromDatetime(datetime.fromisoformat(text))
        except (ValueError, OverflowError):
            pass
    return ts
