"""Plain types shared by the client twins: argument aliases, per-call parameter sets, results.

Results read as Python values: a finish reason or a role is a ``str`` enum (``"stop"``,
``"assistant"``), a duration is a ``float`` of seconds. Each keeps the protobuf it came from
(``FinishReason.proto``, ``Role.proto``, ``Usage.proto``) for code that wants the message.

The argument aliases are declared ``TypeAlias`` on purpose: an implicit alias whose right-hand
side names a protobuf class is not a valid type when mypy cannot read ``tokenwire.v1`` (an
installed copy without ``py.typed``), and mypy (2.4) then gives every ``async def`` that uses
it in its signature the return type ``Coroutine[..., Coroutine[..., T]]``.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, TypedDict, cast

from google.protobuf import duration_pb2

from tokenwire.v1 import generation_pb2

__all__ = [
    "USE_DEFAULT",
    "ChatParams",
    "Completion",
    "FinishReason",
    "FormatLike",
    "GenerateParams",
    "KeepAliveLike",
    "MessageLike",
    "MetadataLike",
    "OptionsLike",
    "Role",
    "ThinkLike",
    "TimeoutLike",
    "ToolLike",
    "Usage",
    "UseDefault",
]


class UseDefault(enum.Enum):
    """Marker for "use the client's default" where ``None`` already means something."""

    USE_DEFAULT = "USE_DEFAULT"


#: Per-call ``timeout=USE_DEFAULT`` keeps the client's timeout; ``None`` means no deadline.
USE_DEFAULT: Final = UseDefault.USE_DEFAULT

TimeoutLike: TypeAlias = float | None | UseDefault
#: Call metadata: ``[("key", "value"), ...]`` or ``{"key": "value"}``. Keys are lower case.
MetadataLike: TypeAlias = Sequence[tuple[str, str]] | Mapping[str, str]
#: An ``Options`` message or a dict keyed by its field names (``temperature``, ``max_tokens``...).
OptionsLike: TypeAlias = generation_pb2.Options | Mapping[str, Any]
#: ``"json"`` for any JSON value, a dict holding a JSON Schema (sent as JSON text, so its key
#: order is kept), a ``Struct`` (sent as one: key order not kept) or a ``Format`` message.
FormatLike: TypeAlias = Literal["json"] | Mapping[str, Any] | generation_pb2.Format
#: ``True``/``False``, an effort level, or a ``Think`` enum value.
ThinkLike: TypeAlias = bool | Literal["low", "medium", "high"] | generation_pb2.Think
#: Seconds (negative: keep loaded forever), a ``timedelta`` or a ``Duration``.
KeepAliveLike: TypeAlias = float | datetime.timedelta | duration_pb2.Duration
#: A ``Message`` or a dict such as ``{"role": "user", "content": "hi"}``.
MessageLike: TypeAlias = generation_pb2.Message | Mapping[str, Any]
#: A ``Tool`` or a dict ``{"name", "description", "parameters"}`` (OpenAI-style
#: ``{"type": "function", "function": {...}}`` is accepted too); ``parameters`` is a dict
#: (sent as JSON text, key order kept), JSON text, or a ``Struct``.
ToolLike: TypeAlias = generation_pb2.Tool | Mapping[str, Any]


class GenerateParams(TypedDict, total=False):
    """Keyword arguments of a Generate request besides ``model`` and ``prompt``."""

    system: str | None
    options: OptionsLike | None
    format: FormatLike | None
    keep_alive: KeepAliveLike | None
    images: Sequence[bytes]
    think: ThinkLike | None
    suffix: str
    raw: bool
    resumable: bool
    detach_grace: KeepAliveLike | None


class ChatParams(TypedDict, total=False):
    """Keyword arguments of a Chat request besides ``model`` and ``messages``."""

    tools: Sequence[ToolLike]
    options: OptionsLike | None
    format: FormatLike | None
    keep_alive: KeepAliveLike | None
    think: ThinkLike | None
    resumable: bool
    detach_grace: KeepAliveLike | None


class FinishReason(enum.StrEnum):
    """Why an answer ended, as a string: ``"stop"``, ``"length"``, ``"tool_calls"``...

    A ``str``, so ``completion.finish_reason == "stop"`` and ``print()``/JSON show the word;
    ``.proto`` is the ``tokenwire.v1.FinishReason`` number it came from.
    """

    UNSPECIFIED = "unspecified"
    #: The model ended its answer (or, on Ollama, met a stop sequence).
    STOP = "stop"
    #: ``max_tokens`` was reached, or the context window filled up.
    LENGTH = "length"
    #: A stop sequence, from engines that report it apart from ``STOP``.
    STOP_SEQUENCE = "stop_sequence"
    #: The request only loaded the model (empty prompt or no messages).
    LOAD = "load"
    #: The request only unloaded the model (empty prompt with ``keep_alive`` 0).
    UNLOAD = "unload"
    #: A reason tokenwire does not name; see ``Usage.engine_finish_reason``.
    OTHER = "other"
    #: The model asked for tool calls (``Completion.tool_calls``).
    TOOL_CALLS = "tool_calls"
    #: The engine's content filter stopped the answer.
    CONTENT_FILTER = "content_filter"

    @property
    def proto(self) -> generation_pb2.FinishReason:
        """The protobuf enum number (``generation_pb2.FINISH_REASON_STOP``...)."""
        number = generation_pb2.FinishReason.Value("FINISH_REASON_" + self.name)
        return cast(generation_pb2.FinishReason, number)  # the stubs type Value() as int

    @classmethod
    def from_proto(cls, value: int) -> FinishReason:
        """The member for a protobuf number; a number newer than this client is ``OTHER``."""
        try:
            name = generation_pb2.FinishReason.Name(value)
        except ValueError:
            return cls.OTHER
        return cls[name.removeprefix("FINISH_REASON_")]


class Role(enum.StrEnum):
    """Who wrote a chat message, as a string: ``"system"``, ``"user"``, ``"assistant"``,
    ``"tool"``. Accepted wherever a message dict's ``"role"`` is; ``.proto`` is the
    ``tokenwire.v1.Role`` number."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"

    @property
    def proto(self) -> generation_pb2.Role:
        """The protobuf enum number (``generation_pb2.ROLE_USER``...)."""
        return cast(generation_pb2.Role, generation_pb2.Role.Value("ROLE_" + self.name))

    @classmethod
    def from_proto(cls, value: int) -> Role:
        """The member for a protobuf number (``ValueError`` for ``ROLE_UNSPECIFIED``)."""
        name = generation_pb2.Role.Name(value)
        if name == "ROLE_UNSPECIFIED":
            raise ValueError("the message has no role (ROLE_UNSPECIFIED)")
        return cls[name.removeprefix("ROLE_")]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and timings of one answer; durations are ``float`` seconds (0.0 when
    the engine did not report them). ``proto`` is the ``tokenwire.v1.Usage`` message."""

    #: Prompt tokens the engine evaluated (0 when served from its cache).
    prompt_tokens: int = 0
    #: Tokens generated.
    completion_tokens: int = 0
    #: The engine's whole time for the request, queueing and model loading included.
    total_duration: float = 0.0
    #: Time the engine spent loading the model.
    load_duration: float = 0.0
    #: Time the engine spent reading the prompt.
    prompt_eval_duration: float = 0.0
    #: Time the engine spent generating.
    eval_duration: float = 0.0
    #: Generated tokens per second of ``eval_duration``, as the engine measured it.
    eval_tokens_per_second: float = 0.0
    #: Measured by the gateway: from receiving the call to sending the first text,
    #: thinking or tool call.
    time_to_first_token: float = 0.0
    #: Measured by the gateway: upstream chunks per second from the first to the last.
    tokens_per_second: float = 0.0
    #: Measured by the gateway: from receiving the call to sending the final message.
    gateway_duration: float = 0.0
    #: The engine's own word for why it stopped (``"stop"``, ``"length"``...).
    engine_finish_reason: str = ""
    #: The upstream that served the call, by the gateway's configured name.
    upstream: str = ""
    #: Upstream attempts the call took (1: the first upstream answered).
    attempts: int = 0
    #: The message these values were read from.
    proto: generation_pb2.Usage = field(
        default_factory=generation_pb2.Usage, repr=False, compare=False
    )

    @classmethod
    def from_proto(cls, usage: generation_pb2.Usage) -> Usage:
        """Read every field of ``usage``; ``Duration`` fields become seconds."""
        values: dict[str, Any] = {}
        for descriptor in usage.DESCRIPTOR.fields:
            value = getattr(usage, descriptor.name)
            if isinstance(value, duration_pb2.Duration):
                value = value.seconds + value.nanos / 1e9
            values[descriptor.name] = value
        return cls(**values, proto=usage)


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer, from a finished stream or from the unary Complete call."""

    text: str
    thinking: str
    tool_calls: tuple[generation_pb2.ToolCall, ...]
    #: Why the answer ended (a ``str`` enum: ``"stop"``, ``"length"``...).
    finish_reason: FinishReason
    #: Token counts and timings (seconds); all zero when the gateway sent none.
    usage: Usage
    model: str
    request_id: str | None

    @property
    def upstream(self) -> str:
        """The upstream that served the call, by the gateway's configured name ("" when
        the gateway did not say)."""
        return self.usage.upstream

    @property
    def attempts(self) -> int:
        """Upstream attempts the call took (1: the first upstream answered; 0 when the
        gateway did not say)."""
        return self.usage.attempts

    @property
    def finish_reason_name(self) -> str:
        """``"STOP"``, ``"LENGTH"``... (the protobuf enum name without its prefix)."""
        return self.finish_reason.name

    def to_message(self) -> generation_pb2.Message:
        """The assistant turn to append to a chat history."""
        return generation_pb2.Message(
            role=generation_pb2.ROLE_ASSISTANT,
            content=self.text,
            tool_calls=self.tool_calls,
            thinking=self.thinking,
        )

    @classmethod
    def from_final(
        cls,
        final: generation_pb2.Token | generation_pb2.CompleteResponse,
        *,
        text: str,
        thinking: str,
        tool_calls: tuple[generation_pb2.ToolCall, ...],
        request_id: str | None,
    ) -> Completion:
        """Build from the final Token of a stream (with the text gathered from it) or from
        a CompleteResponse."""
        return cls(
            text=text,
            thinking=thinking,
            tool_calls=tool_calls,
            finish_reason=FinishReason.from_proto(final.finish_reason),
            usage=Usage.from_proto(final.usage) if final.HasField("usage") else Usage(),
            model=final.model,
            request_id=request_id,
        )

    @classmethod
    def from_response(
        cls, response: generation_pb2.CompleteResponse, request_id: str | None
    ) -> Completion:
        return cls.from_final(
            response,
            text=response.text,
            thinking=response.thinking,
            tool_calls=tuple(response.tool_calls),
            request_id=request_id,
        )
