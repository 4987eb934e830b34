"""Grouping of upstream chunks into messages (Delivery in the proto).

adaptive    everything that piled up while the caller was busy, never waiting
each token  exactly one chunk per message
batch       wait until N chunks, or the oldest is M ms old, or a sentence ends
The final (done) chunk is never held back. A batch also goes out once it holds as
many chunks or bytes as the relay may hold pending, so memory stays bounded.

Whatever the mode, no message is built over ``--max-message-bytes``: a Token that
would be larger is cut into several (``split_message``).
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol

from tokenwire.v1 import generation_pb2 as pb

from ._exceptions import ProtocolError
from .backends._base import Event

__all__ = ["Grouper", "Source", "split_message"]


class Source(Protocol):
    """Where a Grouper takes chunks from: a Relay's writer side, or a resumable
    stream's Cursor."""

    max_pending: int
    max_pending_bytes: int
    taken_sizes: list[int]

    async def take(self, max_items: int = 0,
                   wait: float | None = None) -> list[Event] | None: ...

#: Bytes a part keeps free for its own field tags and lengths.
_PART_OVERHEAD = 64


def _cut(text: str, room: int) -> list[str]:
    """``text`` in pieces of at most ``room`` UTF-8 bytes, cut on character boundaries."""
    raw = text.encode()
    pieces, start = [], 0
    while start < len(raw):
        end = min(start + room, len(raw))
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # inside a character
            end -= 1
        pieces.append(raw[start:end].decode())
        start = end
    return pieces


def split_message(token: pb.Token, budget: int) -> list[pb.Token]:
    """Cuts a Token whose encoding is over ``budget`` bytes into Tokens that each fit:
    its text, then its thinking text, then its tool calls. Concatenating the parts'
    texts gives the token's text (and so for thinking); only the last part carries
    ``chunk_count``, and every part the token's ``position``. A single tool call too
    large for a message is a ProtocolError."""
    room = budget - _PART_OVERHEAD
    parts = [pb.Token(text=piece) for piece in _cut(token.text, room)]
    parts += [pb.Token(thinking=piece) for piece in _cut(token.thinking, room)]
    current = pb.Token()
    for call in token.tool_calls:
        size = call.ByteSize() + _PART_OVERHEAD
        if size > room:
            raise ProtocolError(f"Ollama sent a tool call of {size} bytes, larger than one "
                                f"message may be (--max-message-bytes {budget})")
        if current.tool_calls and current.ByteSize() + size > room:
            parts.append(current)
            current = pb.Token()
        current.tool_calls.append(call)
    if current.tool_calls or not parts:
        parts.append(current)
    parts[-1].chunk_count = token.chunk_count
    if token.position:  # a resumable stream's: every part is of the same chunks
        for part in parts:
            part.position = token.position
    return parts

_SENTENCE_END = re.compile(r"[.!?\n]\s*$")


class Grouper:
    def __init__(self, relay: Source, delivery: pb.Delivery) -> None:
        self._relay = relay
        self._mode = delivery.mode
        self._max_tokens = delivery.max_tokens
        self._max_delay = (delivery.max_delay.ToNanoseconds() / 1e9
                           if delivery.HasField("max_delay") else 0.0)
        self._sentences = delivery.at_sentence_end
        self._held: list[Event] = []
        self._sizes: list[int] = []  # line bytes of each held chunk
        self._since = 0.0  # when the oldest held chunk arrived
        self._error: Exception | None = None

    async def next(self) -> list[Event]:
        """The next group of chunks; [] once the stream has ended."""
        if self._error is not None:
            raise self._error
        if self._mode == pb.DELIVERY_MODE_EACH_TOKEN:
            return await self._relay.take(max_items=1) or []
        if self._mode != pb.DELIVERY_MODE_BATCH:
            return await self._relay.take() or []
        return await self._next_batch()

    def _cut(self) -> int:
        """How many held chunks form a complete group (0: none yet)."""
        relay = self._relay
        if len(self._held) >= relay.max_pending or sum(self._sizes) >= relay.max_pending_bytes:
            return len(self._held)  # as much as the relay may hold: memory stays bounded
        for i, chunk in enumerate(self._held):
            if (chunk[3] is not None
                    or (self._max_tokens and i + 1 >= self._max_tokens)
                    or (self._sentences and _SENTENCE_END.search(chunk[0]))):
                return i + 1
        return 0

    async def _next_batch(self) -> list[Event]:
        loop = asyncio.get_running_loop()
        while True:
            cut = self._cut()
            if cut:
                return self._flush_upto(cut)
            wait = None
            if self._held and self._max_delay:
                wait = max(self._since + self._max_delay - loop.time(), 0.0)
            try:
                got = await self._relay.take(wait=wait)
            except Exception as exc:
                if not self._held:
                    raise
                self._error = exc  # deliver what is held first, fail on the next call
                return self._flush_upto(len(self._held))
            if not got:  # None: the oldest held chunk is max_delay old; []: the end
                return self._flush_upto(len(self._held))
            if not self._held:
                self._since = loop.time()
            self._held.extend(got)
            self._sizes.extend(self._relay.taken_sizes)

    def _flush_upto(self, n: int) -> list[Event]:
        group, self._held = self._held[:n], self._held[n:]
        del self._sizes[:n]
        if self._held:
            self._since = asyncio.get_running_loop().time()
        return group
