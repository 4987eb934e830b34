"""Request builders shared by both client twins: friendly Python values in, messages out.

Every builder also accepts the finished message (``Options``, ``Message``, ``Tool``...)
and passes it through unchanged, so callers can use either style.

A JSON Schema given as a dict (``format=``, a tool's ``parameters``) is sent as JSON text
(``Format.json_schema_text``, ``Tool.parameters_text``): ``json.dumps`` writes a dict's keys
in insertion order, and the engine builds its grammar in property order, whereas a
``Struct`` is a map whose key order the receiving process does not keep. A ``Struct``
given by the caller is still sent as one.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from tokenwire.client._types import (
    FormatLike,
    KeepAliveLike,
    MessageLike,
    OptionsLike,
    Role,
    ThinkLike,
    ToolLike,
)
from tokenwire.v1 import generation_pb2

__all__ = [
    "build_chat_request",
    "build_embed_request",
    "build_generate_request",
    "build_message",
    "build_options",
    "build_tool",
    "build_tool_call",
]

_THINK_LEVELS: dict[str, generation_pb2.Think] = {
    "low": generation_pb2.THINK_LOW,
    "medium": generation_pb2.THINK_MEDIUM,
    "high": generation_pb2.THINK_HIGH,
}
_ROLES: dict[str, generation_pb2.Role] = {role.value: role.proto for role in Role}
_OPTION_NAMES = frozenset(generation_pb2.Options.DESCRIPTOR.fields_by_name)
_MESSAGE_KEYS = frozenset(generation_pb2.Message.DESCRIPTOR.fields_by_name)


def build_generate_request(
    model: str,
    prompt: str,
    *,
    system: str | None = None,
    options: OptionsLike | None = None,
    format: FormatLike | None = None,
    keep_alive: KeepAliveLike | None = None,
    images: Sequence[bytes] = (),
    think: ThinkLike | None = None,
    suffix: str = "",
    raw: bool = False,
    resumable: bool = False,
    detach_grace: KeepAliveLike | None = None,
) -> generation_pb2.GenerateRequest:
    """Build a ``GenerateRequest``; unset arguments keep the model's defaults."""
    return generation_pb2.GenerateRequest(
        resumable=_resumable(resumable, detach_grace),
        model=model,
        prompt=prompt,
        system=system or "",
        options=build_options(options),
        format=_format(format),
        keep_alive=_duration(keep_alive),
        images=list(images),
        think=_think(think),
        suffix=suffix,
        raw=raw,
    )


def build_chat_request(
    model: str,
    messages: Sequence[MessageLike],
    *,
    tools: Sequence[ToolLike] = (),
    options: OptionsLike | None = None,
    format: FormatLike | None = None,
    keep_alive: KeepAliveLike | None = None,
    think: ThinkLike | None = None,
    resumable: bool = False,
    detach_grace: KeepAliveLike | None = None,
) -> generation_pb2.ChatRequest:
    """Build a ``ChatRequest`` from messages given as ``Message`` or ``{"role", "content"}``."""
    return generation_pb2.ChatRequest(
        resumable=_resumable(resumable, detach_grace),
        model=model,
        messages=[build_message(m) for m in messages],
        tools=[build_tool(t) for t in tools],
        options=build_options(options),
        format=_format(format),
        keep_alive=_duration(keep_alive),
        think=_think(think),
    )


def build_embed_request(
    model: str,
    inputs: str | Sequence[str],
    *,
    truncate: bool | None = None,
    dimensions: int | None = None,
    keep_alive: KeepAliveLike | None = None,
) -> generation_pb2.EmbedRequest:
    """Build an ``EmbedRequest``; a single string is one input."""
    return generation_pb2.EmbedRequest(
        model=model,
        inputs=[inputs] if isinstance(inputs, str) else list(inputs),
        truncate=truncate,
        dimensions=dimensions,
        keep_alive=_duration(keep_alive),
    )


def build_options(options: OptionsLike | None) -> generation_pb2.Options | None:
    """``Options`` from a dict keyed by its field names (``temperature``, ``stop``...)."""
    if options is None or isinstance(options, generation_pb2.Options):
        return options
    unknown = sorted(set(options) - _OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {sorted(_OPTION_NAMES)}")
    return generation_pb2.Options(**{k: v for k, v in options.items() if v is not None})


def build_message(message: MessageLike) -> generation_pb2.Message:
    """``Message`` from ``{"role": "user", "content": ...}`` (plus any other Message field)."""
    if isinstance(message, generation_pb2.Message):
        return message
    unknown = sorted(set(message) - _MESSAGE_KEYS)
    if unknown:
        raise ValueError(f"unknown message key(s) {unknown}")
    fields = dict(message)
    role = fields.pop("role", None)
    if isinstance(role, str):
        if role.lower() not in _ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {sorted(_ROLES)}")
        role = _ROLES[role.lower()]
    calls = [build_tool_call(c) for c in fields.pop("tool_calls", ())]
    return generation_pb2.Message(role=role, tool_calls=calls, **fields)


def build_tool(tool: ToolLike) -> generation_pb2.Tool:
    """``Tool`` from ``{"name", "description", "parameters"}`` or the OpenAI-style wrapper.

    ``parameters`` may be a dict (sent as JSON text, key order kept), JSON text (sent as
    written) or a ``Struct`` (sent as one: key order not kept).
    """
    if isinstance(tool, generation_pb2.Tool):
        return tool
    spec = tool.get("function", tool)
    parameters = spec.get("parameters")
    message = generation_pb2.Tool(name=spec["name"], description=spec.get("description", ""))
    if isinstance(parameters, struct_pb2.Struct):
        message.parameters.CopyFrom(parameters)
    elif isinstance(parameters, str):
        message.parameters_text = parameters
    elif parameters is not None:
        message.parameters_text = _json_text(parameters)
    return message


def build_tool_call(call: generation_pb2.ToolCall | Mapping[str, Any]) -> generation_pb2.ToolCall:
    """``ToolCall`` from ``{"name", "arguments"}`` (arguments as a dict or JSON text)."""
    if isinstance(call, generation_pb2.ToolCall):
        return call
    spec = call.get("function", call)
    arguments = spec.get("arguments")
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return generation_pb2.ToolCall(
        id=call.get("id", ""),
        name=spec["name"],
        arguments=_struct(arguments),
        index=spec.get("index", call.get("index", 0)),
    )


def _struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _json_text(value: object) -> str:
    """Compact JSON text of a dict, its keys in their insertion order."""
    def plain(item: object) -> object:  # other mappings and sequences, e.g. a nested Struct
        if isinstance(item, Mapping):
            return dict(item)
        if isinstance(item, Sequence) and not isinstance(item, str | bytes):
            return list(item)
        raise TypeError(f"{type(item).__name__} is not a JSON value")

    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                      default=plain)


def _format(fmt: FormatLike | None) -> generation_pb2.Format | None:
    if fmt is None or isinstance(fmt, generation_pb2.Format):
        return fmt
    if isinstance(fmt, str):
        if fmt != "json":
            raise ValueError(f"format must be 'json' or a JSON Schema dict, not {fmt!r}")
        return generation_pb2.Format(json=True)
    if isinstance(fmt, struct_pb2.Struct):
        return generation_pb2.Format(json_schema=fmt)
    return generation_pb2.Format(json_schema_text=_json_text(fmt))


def _think(think: ThinkLike | None) -> generation_pb2.Think:
    if think is None:
        return generation_pb2.THINK_UNSPECIFIED
    if isinstance(think, bool):
        return generation_pb2.THINK_ENABLED if think else generation_pb2.THINK_DISABLED
    if isinstance(think, str):
        if think not in _THINK_LEVELS:
            raise ValueError(f"think must be a bool or one of {sorted(_THINK_LEVELS)}")
        return _THINK_LEVELS[think]
    return think


def _duration(value: KeepAliveLike | None) -> duration_pb2.Duration | None:
    if value is None or isinstance(value, duration_pb2.Duration):
        return value
    duration = duration_pb2.Duration()
    if isinstance(value, datetime.timedelta):
        duration.FromTimedelta(value)
    else:
        duration.FromNanoseconds(round(value * 1_000_000_000))
    return duration


def _resumable(resumable: bool, detach_grace: KeepAliveLike | None
               ) -> generation_pb2.Resumable | None:
    """The ``resumable`` field: set when asked for (a grace implies it)."""
    if not resumable and detach_grace is None:
        return None
    return generation_pb2.Resumable(detach_grace=_duration(detach_grace))
