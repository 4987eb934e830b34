"""The OpenAI-compatible backend: an engine behind the OpenAI API (hosted APIs, vLLM,
llama.cpp's server, llama-cpp-python, Ollama's ``/v1``).

``base_url`` is the API's base, with its version path (``https://api.openai.com/v1``,
``http://127.0.0.1:11434/v1``). Streams are ``/chat/completions`` (or ``/completions``
for a raw or suffix prompt) as Server-Sent Events with ``stream_options.include_usage``;
``/models`` lists models and is the health probe; ``/embeddings`` embeds. The API key
goes in an ``Authorization: Bearer`` header and nowhere else (never in a message, a
log line or the printed configuration).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import httpx

from tokenwire.v1 import generation_pb2 as pb

from ..._exceptions import UpstreamError
from .._base import Event, StreamRequest
from .._breaker import CircuitBreaker
from .._http import Headers, HTTPEngine
from ._answers import ChatStream, TextStream, embed_response, models_from_list
from ._errors import classify_http_error
from ._payloads import FLAVORS, chat_payload, embed_payload, generate_payload

__all__ = ["OpenAIBackend"]


class OpenAIBackend(HTTPEngine):
    """One OpenAI-compatible engine, as a ``backends.Backend``. ``flavor`` ("openai",
    "llama.cpp", "vllm") says which options beyond the standard ones it takes."""

    engine = "the OpenAI-compatible engine"
    provider = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        flavor: str = "openai",
        name: str = "openai",
        connect_timeout: float = 5.0,
        max_connections: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker: CircuitBreaker | None = None,
        unary_timeout: float = 120.0,
        max_body_bytes: int = 128 << 20,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; one of {', '.join(FLAVORS)}")
        self.flavor = flavor
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__(base_url, name=name, connect_timeout=connect_timeout,
                         max_connections=max_connections, transport=transport,
                         breaker=breaker, unary_timeout=unary_timeout,
                         max_body_bytes=max_body_bytes, ssl_context=ssl_context,
                         headers=headers)

    def classify(self, status: int, body: bytes, headers: Headers, model: str,
                 path: str) -> UpstreamError:
        return classify_http_error(status, body, headers, model, path)

    # -- the Backend interface ---------------------------------------------------

    def stream(self, request: StreamRequest
               ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]:
        if isinstance(request, pb.GenerateRequest):
            path, payload, kind = generate_payload(request, backend=self.name,
                                                   flavor=self.flavor)
        else:
            path, payload, kind = chat_payload(request, backend=self.name, flavor=self.flavor)
        decoder = ChatStream() if kind == "chat" else TextStream()
        return self.post_stream(path, payload, ("sse", decoder), accept=b"text/event-stream")

    async def models(self, *, deadline: float | None = None) -> list[pb.Model]:
        return models_from_list(await self.request_json("GET", "/models", deadline=deadline))

    async def embed(self, request: pb.EmbedRequest, *,
                    deadline: float | None = None) -> pb.EmbedResponse:
        body = await self.request_json("POST", "/embeddings",
                                       embed_payload(request, backend=self.name),
                                       deadline=deadline)
        return embed_response(body, request.model)

    async def probe(self, *, timeout: float) -> None:  # noqa: ASYNC109 - a probe's bound
        await self.request_json("GET", "/models", deadline=timeout, probe=True)
