"""OpenAI-compatible answers as tokenwire values: pure, no I/O.

A streamed answer is Server-Sent Events; ``ChatStream`` (``/chat/completions``) and
``TextStream`` (``/completions``) decode one stream each, event by event, and keep
what spans events: tool calls assembled from their deltas, the finish reason, the
usage chunk (which comes after the finish, with ``choices: []``), the end.

The rules the servers keep, and the ones they break (``scripts/openai-wire-notes.md``):

* ``data: [DONE]`` ends the stream; an answer ends at a finish reason and
  ``[DONE]``. ``[DONE]`` without any finish reason (llama-cpp-python when a request
  interrupts it) and an end with neither are truncated, never a short success; a
  finish reason without ``[DONE]`` is accepted at the end of the body.
* An ``{"error": ...}`` event, or ``event: error``, after HTTP 200 fails the stream.
* The first delta may prime the role with no text (llama-cpp-python), or every
  delta may carry the role (Ollama): nothing is delivered for an empty delta.
* Tool calls come as deltas by ``index``; the first piece has ``id`` and the name,
  later ones pieces of the arguments string. Tolerated: no ``index`` (a new ``id``
  starts a new call), every call at index 0 with new ids, the id and name repeated
  on every piece (llama-cpp-python), arguments as an object, whole calls in one
  chunk. A stream that made tool calls and says ``stop`` finished for the tools.
* Reasoning arrives as ``reasoning_content`` (llama.cpp, vLLM) or ``reasoning``
  (Ollama): both are thinking text.
* Usage may be missing (llama-cpp-python ignores ``stream_options``): then
  completion_tokens is the number of chunks that carried output, as counted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
from google.protobuf.duration_pb2 import Duration

from tokenwire.v1 import generation_pb2 as pb

from ..._exceptions import ProtocolError, StreamError, TruncatedStream, excerpt
from .._base import Event, Final

__all__ = ["ChatStream", "TextStream", "embed_response", "finish_reason", "models_from_list"]

_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "function_call": pb.FINISH_REASON_TOOL_CALLS,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
}
_UINT32 = 2**32 - 1


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    """What the gateway reads of a chat completion chunk; the rest is skipped unbuilt."""

    choices: list[_Choice] | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None  # llama.cpp's server
    error: Any = None


#: Decodes a chunk typed: msgspec builds only the fields above and checks their types
#: as it goes (a chunk is about 3x cheaper than a full orjson parse: 0.33 against 1.07
#: µs for Ollama's /v1 chunk on the dev box, which keeps the SSE path near the NDJSON one).
_CHUNK = msgspec.json.Decoder(_Chunk)


def finish_reason(reason: str, made_tool_calls: bool = False) -> int:
    if reason == "stop" and made_tool_calls:
        return pb.FINISH_REASON_TOOL_CALLS
    return _FINISH.get(reason, pb.FINISH_REASON_OTHER)


def _object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the engine sent {what} that is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"the engine sent {what} that is not a JSON object")
    return value


def _error(kind: str, chunk: dict[str, Any] | None, data: bytes) -> StreamError | None:
    """The failure an event reports, if it reports one."""
    error = chunk.get("error") if chunk is not None else None
    if error is None and kind != "error":
        return None
    if isinstance(error, dict):
        error = error.get("message") or error
    text = excerpt(str(error if error is not None else data.decode("utf-8", "replace")), 400)
    return StreamError(f"the engine reported an error mid-stream: {text}")


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if type(value) is int and 0 <= value <= _UINT32:
        return value
    raise ProtocolError(f"the engine sent usage.{key}={str(value)[:40]!r}, which is not a "
                        f"count (a whole number from 0 to {_UINT32})")


def _duration_ms(value: Any) -> Duration | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e12:
        d = Duration()
        d.FromNanoseconds(int(value * 1e6))
        return d
    return None


@dataclass
class _Call:
    """A tool call being assembled from its deltas."""

    id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)

    def done(self, index: int) -> pb.ToolCall:
        text = "".join(self.pieces)
        call = pb.ToolCall(id=self.id, name=self.name, index=index, arguments_text=text)
        try:
            arguments = orjson.loads(text) if text.strip() else {}
        except orjson.JSONDecodeError:
            arguments = None  # the model's own words: kept in arguments_text
        if isinstance(arguments, dict):
            call.arguments.update(arguments)
        return call


class _Stream:
    """What both stream decoders share: the end, the usage, the finish reason."""

    def __init__(self) -> None:
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._timings: dict[str, Any] | None = None
        self._model = ""
        self._outputs = 0  # chunks that carried text or thinking
        self._ended = False

    def _note(self, chunk: dict[str, Any]) -> None:
        """Notes what a chunk says besides its choice: model, usage, timings."""
        model = chunk.get("model")
        if isinstance(model, str) and len(model) <= 1024:
            self._model = model
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        timings = chunk.get("timings")  # llama.cpp's server
        if isinstance(timings, dict):
            self._timings = timings

    def _finished(self, reason: Any) -> None:
        if isinstance(reason, str):
            self._finish = reason

    def _choice(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Notes the chunk's model, usage, timings and finish reason; returns its first
        choice (None: none)."""
        self._note(chunk)
        choices = chunk.get("choices")
        if not choices:
            return None
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise ProtocolError("the engine sent choices that are not a list of objects")
        choice = choices[0]
        reason = choice.get("finish_reason")
        if reason:
            self._finished(reason)
        return choice

    def _final(self, calls: list[pb.ToolCall] | None) -> Event:
        self._ended = True
        if self._finish is None:
            raise TruncatedStream("the engine ended the stream without a finish reason; the "
                                  "answer is incomplete")
        usage = pb.Usage(engine_finish_reason=self._finish)
        if self._usage is not None:
            usage.prompt_tokens = _count(self._usage, "prompt_tokens")
            usage.completion_tokens = _count(self._usage, "completion_tokens")
        else:
            usage.completion_tokens = self._outputs
        if self._timings is not None:
            prompt = _duration_ms(self._timings.get("prompt_ms"))
            predicted = _duration_ms(self._timings.get("predicted_ms"))
            if prompt is not None:
                usage.prompt_eval_duration.CopyFrom(prompt)
            if predicted is not None:
                usage.eval_duration.CopyFrom(predicted)
                if predicted.ToNanoseconds() > 0:
                    usage.eval_tokens_per_second = (usage.completion_tokens * 1e9
                                                    / predicted.ToNanoseconds())
        final = Final(finish_reason(self._finish, bool(calls)), usage, self._model)
        return ("", "", calls, final)

    def end(self) -> Event | None:
        """At the end of the body without ``[DONE]``: the final event when a finish
        reason came (some servers stop there), else nothing (truncated)."""
        if self._ended or self._finish is None:
            return None
        return self._final(self._calls())

    def _calls(self) -> list[pb.ToolCall] | None:
        return None


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        raise ProtocolError(f"the engine sent {what} that is not a string")
    return value


class ChatStream(_Stream):
    """Decodes one ``/chat/completions`` stream (``SSEDecode``)."""

    def __init__(self) -> None:
        super().__init__()
        self._tool_calls: dict[int, _Call] = {}
        self._by_id: dict[str, int] = {}
        self._slot: dict[int, int] = {}  # the server's index -> the call it means now

    def __call__(self, kind: str, data: bytes) -> Event | None:
        try:  # one event per token: typed, so nothing the gateway does not read is built
            chunk = _CHUNK.decode(data)
        except msgspec.DecodeError as exc:
            if data == b"[DONE]":
                return self._final(self._calls())
            return self._odd(kind, data, exc)
        if kind != "message" or chunk.error is not None:
            return self._odd(kind, data, None)
        if not self._model or chunk.usage is not None or chunk.timings is not None:
            self._note_typed(chunk)
        choices = chunk.choices
        if not choices:
            return None  # the usage chunk, or a chunk with no choice
        choice = choices[0]
        if choice.finish_reason:
            self._finish = choice.finish_reason
        delta = choice.delta
        if delta is None:
            return ("", "", None, None)
        text = delta.content or ""
        thinking = delta.reasoning_content or delta.reasoning or ""
        if delta.tool_calls:
            self._tool_deltas(delta.tool_calls)
        if text or thinking:
            self._outputs += 1
        return (text, thinking, None, None)

    def _odd(self, kind: str, data: bytes, exc: Exception | None) -> Event | None:
        """An event that is not an ordinary chunk: an error report, or not what the
        API says a chunk is."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
        failure = _error(kind, chunk if isinstance(chunk, dict) else None, data)
        if failure is not None:
            raise failure
        why = str(exc).split("\n")[0][:120] if exc is not None else "an unexpected event"
        raise ProtocolError(f"the engine sent an event that is not a chat completion chunk "
                            f"({why})")

    def _note_typed(self, chunk: _Chunk) -> None:
        if chunk.model and len(chunk.model) <= 1024:
            self._model = chunk.model
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.timings is not None:
            self._timings = chunk.timings

    def _tool_deltas(self, deltas: Any) -> None:
        if not isinstance(deltas, list):
            raise ProtocolError("the engine sent tool_calls that are not a list")
        for delta in deltas:
            if not isinstance(delta, dict):
                raise ProtocolError("the engine sent a tool-call delta that is not an object")
            function = delta.get("function") or {}
            if not isinstance(function, dict):
                raise ProtocolError("the engine sent a tool call whose function is not an "
                                    "object")
            call_id = delta.get("id")
            wire = delta.get("index")
            wire = wire if type(wire) is int else None
            if isinstance(call_id, str) and call_id:
                known = self._by_id.get(call_id)
                if known is not None:
                    index = known  # the id repeated on every piece (llama-cpp-python)
                elif wire is None or wire in self._tool_calls:
                    index = len(self._tool_calls)  # no index, or every call at 0: a new id
                else:
                    index = wire
                self._by_id[call_id] = index
                if wire is not None:
                    self._slot[wire] = index  # later pieces at this index belong here
            elif wire is not None:
                index = self._slot.get(wire, wire)
            else:
                index = max(self._tool_calls, default=0)  # a piece of the latest call
            call = self._tool_calls.setdefault(index, _Call())
            if isinstance(call_id, str) and call_id:
                call.id = call_id
            name = function.get("name")
            if isinstance(name, str) and name and not call.name:
                call.name = name
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call.pieces.append(arguments)
            elif isinstance(arguments, dict):  # an object instead of a string
                call.pieces = [orjson.dumps(arguments).decode()]

    def _calls(self) -> list[pb.ToolCall] | None:
        if not self._tool_calls:
            return None
        return [call.done(position)
                for position, (_, call) in enumerate(sorted(self._tool_calls.items()))]


class TextStream(_Stream):
    """Decodes one ``/completions`` stream (``SSEDecode``)."""

    def __call__(self, kind: str, data: bytes) -> Event | None:
        if data == b"[DONE]":
            return self._final(None)
        chunk = _object(data, "an event") if data[:1] == b"{" else None
        failure = _error(kind, chunk, data)
        if failure is not None:
            raise failure
        if chunk is None:
            raise ProtocolError("the engine sent an event that is not JSON")
        choice = self._choice(chunk)
        if choice is None:
            return None
        text = _text(choice.get("text"), "text")
        if text:
            self._outputs += 1
        return (text, "", None, None)


def models_from_list(body: dict[str, Any]) -> list[pb.Model]:
    """The models of a ``/models`` answer."""
    data = body.get("data")
    if not isinstance(data, list):
        raise ProtocolError("the engine's /models answer has no data list")
    models = []
    for item in data:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            model = pb.Model(name=item["id"][:1024])
            created = item.get("created")
            if type(created) is int and 0 < created < 2**40:
                model.modified_at.FromSeconds(created)
            models.append(model)
    return models


def embed_response(body: dict[str, Any], model: str) -> pb.EmbedResponse:
    """An ``/embeddings`` answer as an EmbedResponse (vectors in input order)."""
    data = body.get("data")
    if not isinstance(data, list):
        raise ProtocolError("the engine's /embeddings answer has no data list")
    ordered: list[tuple[int, list[float]]] = []
    for position, item in enumerate(data):
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vector, list) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
            raise ProtocolError(f"the engine's embedding {position} is not a list of numbers")
        index = item.get("index", position)
        ordered.append((index if type(index) is int else position, vector))
    ordered.sort(key=lambda pair: pair[0])
    usage = body.get("usage")
    name = body.get("model")
    return pb.EmbedResponse(
        embeddings=[pb.Embedding(values=vector) for _, vector in ordered],
        model=name if isinstance(name, str) and name else model,
        prompt_tokens=_count(usage, "prompt_tokens") if isinstance(usage, dict) else 0,
    )
