"""Ollama's answers as tokenwire values: pure functions, no I/O.

Stream lines become neutral events (``backends._base.Event``), decoded once, in the
transport's socket callback; the final line's figures become a ``Final``; model lists
and embeddings become their messages.

What comes from the upstream is checked as it is converted: a count that is not a
whole number from 0 to 2**32-1, a duration that is not whole nanoseconds from 0 to
2**63-1, or a field of the wrong type raises ProtocolError (naming the field),
never a TypeError or ValueError that would end the call as INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tokenwire.v1 import generation_pb2 as pb

from ..._exceptions import ProtocolError
from .._base import Event, Final
from ._errors import stream_error

__all__ = [
    "chat_event",
    "embed_response",
    "finish_reason",
    "generate_event",
    "model_from_tag",
    "model_name",
    "models_from_tags",
    "parse_object",
    "tool_calls_from",
    "usage_from",
]

#: One parsed JSON object from Ollama.
Chunk = dict[str, Any]

_FINISH: dict[str, pb.FinishReason] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "load": pb.FINISH_REASON_LOAD,
    "unload": pb.FINISH_REASON_UNLOAD,
}


# -- stream lines -----------------------------------------------------------------


def parse_object(raw: bytes) -> Chunk:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"Ollama sent a body that is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ProtocolError("Ollama sent JSON that is not an object")
    return value


def _line(raw: bytes) -> Chunk:
    chunk = parse_object(raw)
    error = chunk.get("error")
    if error is not None:
        raise stream_error(error)
    return chunk


def _event(chunk: Chunk, text: Any, thinking: Any, calls: Any) -> Event:
    if type(text) is not str or type(thinking) is not str:
        raise ProtocolError("Ollama sent a chunk whose text or thinking text is not a string")
    return (text, thinking, tool_calls_from(calls) if calls else None,
            final_of(chunk) if chunk.get("done") is True else None)


def generate_event(raw: bytes) -> Event:
    """One line of an /api/generate stream (or its whole load/unload answer)."""
    chunk = _line(raw)
    return _event(chunk, chunk.get("response") or "", chunk.get("thinking") or "",
                  chunk.get("tool_calls"))


def chat_event(raw: bytes) -> Event:
    """One line of an /api/chat stream (or its whole load/unload answer)."""
    chunk = _line(raw)
    message = chunk.get("message") or {}
    if type(message) is not dict:
        raise ProtocolError("Ollama sent a chat chunk whose message is not an object")
    return _event(chunk, message.get("content") or "", message.get("thinking") or "",
                  message.get("tool_calls"))


def final_of(chunk: Chunk) -> Final:
    """The end of an answer from its final line; figures it cannot read make a Final
    that carries the error (the line's text is delivered before the call fails)."""
    try:
        usage = usage_from(chunk)
        model = model_name(chunk, "")
    except ProtocolError as exc:
        return Final(pb.FINISH_REASON_UNSPECIFIED, pb.Usage(), "", exc)
    return Final(finish_reason(usage.engine_finish_reason), usage, model)


# -- values ---------------------------------------------------------------------


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
            call.arguments_text = orjson.dumps(arguments).decode()  # Ollama's key order
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
