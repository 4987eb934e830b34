"""What every backend gives the core: neutral events, and one interface.

An engine's answer reaches the core as a sequence of events, one per engine chunk,
each decoded once from the bytes of its frame (an NDJSON line, an SSE event) in the
transport's socket callback:

    Event = (text, thinking, tool calls or None, Final or None)

``Final`` is set on the last event only: why the answer ended and the engine's own
figures. The servicer, the relay, the delivery modes, limits and metrics see only
these; nothing above ``backends`` reads an engine's JSON. A plain tuple, not a
class: one is built per token, and a tuple is the cheapest object Python makes.

A backend raises only the exceptions of ``_exceptions`` and decides for each
failure whether it is an outage (``UpstreamError.outage``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from tokenwire.v1 import generation_pb2 as pb

from .._exceptions import ProtocolError
from ._breaker import CircuitBreaker

__all__ = ["Backend", "Decode", "Event", "Final", "StreamRequest"]


@dataclass(slots=True)
class Final:
    """The end of an answer."""

    #: FinishReason (an int of the enum).
    finish_reason: int
    #: The engine's counts and durations; the gateway adds its own figures.
    usage: pb.Usage
    #: The model that answered, as the engine names it ("" = as the request named it).
    model: str = ""
    #: The final frame could not be read (its figures): the call fails with this once
    #: the event's text was delivered.
    error: ProtocolError | None = None


Event = tuple[str, str, "list[pb.ToolCall] | None", "Final | None"]
#: Decodes one frame of an engine's stream (raises UpstreamError).
Decode = Callable[[bytes], Event]
StreamRequest = pb.GenerateRequest | pb.ChatRequest


class Backend(Protocol):
    """One upstream engine. ``stream`` opens an answer: leaving its ``async with``
    block (normally, by error or by cancellation) closes the HTTP response, which
    is how the engine learns to stop. What it yields is iterated for
    ``(event, frame size in bytes)`` pairs, or is a transport ``Response`` that
    pushes them from its socket callback (``Response.deliver``)."""

    #: The upstream's name in messages and metrics, and its URL without a password.
    name: str
    base_url: str
    breaker: CircuitBreaker

    def stream(self, request: StreamRequest
               ) -> AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]: ...

    async def models(self, *, deadline: float | None = None) -> list[pb.Model]: ...

    async def embed(self, request: pb.EmbedRequest, *,
                    deadline: float | None = None) -> pb.EmbedResponse: ...

    async def probe(self, *, timeout: float) -> None:  # noqa: ASYNC109 - a probe's bound
        """Raises UpstreamError unless the engine answers; goes through an open
        circuit (and can close it)."""

    async def aclose(self) -> None: ...
