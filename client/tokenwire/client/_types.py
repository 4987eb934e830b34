"""Plain types shared by the client twins: argument aliases, per-call parameter sets, results."""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict

from google.protobuf import duration_pb2

from tokenwire.v1 import generation_pb2

__all__ = [
    "USE_DEFAULT",
    "ChatParams",
    "Completion",
    "FormatLike",
    "GenerateParams",
    "KeepAliveLike",
    "MessageLike",
    "MetadataLike",
    "OptionsLike",
    "ThinkLike",
    "TimeoutLike",
    "ToolLike",
    "UseDefault",
]


class UseDefault(enum.Enum):
    """Marker for "use the client's default" where ``None`` already means something."""

    USE_DEFAULT = "USE_DEFAULT"


#: Per-call ``timeout=USE_DEFAULT`` keeps the client's timeout; ``None`` means no deadline.
USE_DEFAULT: Final = UseDefault.USE_DEFAULT

TimeoutLike = float | None | UseDefault
#: Call metadata: ``[("key", "value"), ...]`` or ``{"key": "value"}``. Keys are lower case.
MetadataLike = Sequence[tuple[str, str]] | Mapping[str, str]
#: An ``Options`` message or a dict keyed by its field names (``temperature``, ``max_tokens``...).
OptionsLike = generation_pb2.Options | Mapping[str, Any]
#: ``"json"`` for any JSON value, a dict holding a JSON Schema (sent as JSON text, so its key
#: order is kept), a ``Struct`` (sent as one: key order not kept) or a ``Format`` message.
FormatLike = Literal["json"] | Mapping[str, Any] | generation_pb2.Format
#: ``True``/``False``, an effort level, or a ``Think`` enum value.
ThinkLike = bool | Literal["low", "medium", "high"] | generation_pb2.Think
#: Seconds (negative: keep loaded forever), a ``timedelta`` or a ``Duration``.
KeepAliveLike = float | datetime.timedelta | duration_pb2.Duration
#: A ``Message`` or a dict such as ``{"role": "user", "content": "hi"}``.
MessageLike = generation_pb2.Message | Mapping[str, Any]
#: A ``Tool`` or a dict ``{"name", "description", "parameters"}`` (OpenAI-style
#: ``{"type": "function", "function": {...}}`` is accepted too); ``parameters`` is a dict
#: (sent as JSON text, key order kept), JSON text, or a ``Struct``.
ToolLike = generation_pb2.Tool | Mapping[str, Any]


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


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer, from a finished stream or from the unary Complete call."""

    text: str
    thinking: str
    tool_calls: tuple[generation_pb2.ToolCall, ...]
    finish_reason: generation_pb2.FinishReason
    usage: generation_pb2.Usage | None
    model: str
    request_id: str | None

    @property
    def upstream(self) -> str:
        """The upstream that served the call, by the gateway's configured name ("" when
        the gateway did not say)."""
        return self.usage.upstream if self.usage is not None else ""

    @property
    def attempts(self) -> int:
        """Upstream attempts the call took (1: the first upstream answered; 0 when the
        gateway did not say)."""
        return self.usage.attempts if self.usage is not None else 0

    @property
    def finish_reason_name(self) -> str:
        """``"STOP"``, ``"LENGTH"``... (the enum name without its prefix)."""
        name = generation_pb2.FinishReason.Name(self.finish_reason)
        return name.removeprefix("FINISH_REASON_")

    def to_message(self) -> generation_pb2.Message:
        """The assistant turn to append to a chat history."""
        return generation_pb2.Message(
            role=generation_pb2.ROLE_ASSISTANT,
            content=self.text,
            tool_calls=self.tool_calls,
            thinking=self.thinking,
        )

    @classmethod
    def from_response(
        cls, response: generation_pb2.CompleteResponse, request_id: str | None
    ) -> Completion:
        return cls(
            text=response.text,
            thinking=response.thinking,
            tool_calls=tuple(response.tool_calls),
            finish_reason=response.finish_reason,
            usage=response.usage if response.HasField("usage") else None,
            model=response.model,
            request_id=request_id,
        )
