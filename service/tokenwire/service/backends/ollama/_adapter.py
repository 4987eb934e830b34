"""The Ollama backend: one Ollama server behind its native API (/api/generate,
/api/chat as NDJSON streams; /api/tags, /api/embed, /api/version as JSON).

The HTTP side (bounded reads, time limits, the lean streaming transport, the
breaker) is ``backends._http.HTTPEngine``; this module says which endpoint each
call uses, and ``_errors.py`` how Ollama's error answers read.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import httpx

from tokenwire.v1 import generation_pb2 as pb

from ..._exceptions import ProtocolError, UpstreamError
from .._base import Event, StreamRequest
from .._breaker import CircuitBreaker
from .._http import Headers, HTTPEngine
from ._answers import chat_event, embed_response, generate_event, models_from_tags
from ._errors import classify_http_error
from ._payloads import chat_payload, embed_payload, generate_payload

__all__ = ["OllamaBackend"]


class OllamaBackend(HTTPEngine):
    """One Ollama server, as a ``backends.Backend``."""

    engine = "Ollama"
    provider = "ollama"
    hint = "check that Ollama is running there, or point --ollama-url/OLLAMA_HOST at it"

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        max_connections: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker: CircuitBreaker | None = None,
        unary_timeout: float = 120.0,
        max_body_bytes: int = 128 << 20,
        name: str = "ollama",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(base_url, name=name, connect_timeout=connect_timeout,
                         max_connections=max_connections, transport=transport,
                         breaker=breaker, unary_timeout=unary_timeout,
                         max_body_bytes=max_body_bytes, ssl_context=ssl_context,
                         accept="application/x-ndjson, application/json")

    def classify(self, status: int, body: bytes, headers: Headers, model: str,
                 path: str) -> UpstreamError:
        return classify_http_error(status, body, model, path)

    # -- the Backend interface ---------------------------------------------------

    def stream(self, request: StreamRequest
               ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]:
        """Opens a Generate (/api/generate) or Chat (/api/chat) answer."""
        if isinstance(request, pb.GenerateRequest):
            return self.post_stream("/api/generate", generate_payload(request),
                                    ("ndjson", generate_event))
        return self.post_stream("/api/chat", chat_payload(request), ("ndjson", chat_event))

    async def models(self, *, deadline: float | None = None) -> list[pb.Model]:
        """The installed models (/api/tags). ``deadline``: seconds the caller has left,
        when it set a deadline."""
        return models_from_tags(await self.request_json("GET", "/api/tags", deadline=deadline))

    async def embed(self, request: pb.EmbedRequest, *,
                    deadline: float | None = None) -> pb.EmbedResponse:
        body = await self.request_json("POST", "/api/embed", embed_payload(request),
                                       deadline=deadline)
        return embed_response(body, request.model)

    async def probe(self, *, timeout: float) -> None:  # noqa: ASYNC109 - a probe's bound
        await self.version(timeout=timeout)

    async def loaded_models(self, *, timeout: float) -> list[str]:  # noqa: ASYNC109
        """The models loaded in memory now (/api/ps), for routing, which prefers an
        upstream that has the model loaded. Asked after each health probe, never per
        call; like the probe, it goes through an open circuit."""
        body = await self.request_json("GET", "/api/ps", deadline=timeout, probe=True)
        running = body.get("models")
        if not isinstance(running, list):
            raise ProtocolError("Ollama's /api/ps answer has no models list")
        return [str(m.get("name") or m.get("model")) for m in running
                if isinstance(m, dict) and (m.get("name") or m.get("model"))]

    async def version(self, *, timeout: float | None = None) -> str:  # noqa: ASYNC109
        """Ollama's version; the health probe (it goes through an open circuit, and
        can close it)."""
        body = await self.request_json("GET", "/api/version", deadline=timeout, probe=True)
        return str(body.get("version", ""))
