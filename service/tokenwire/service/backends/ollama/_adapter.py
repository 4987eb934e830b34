"""The Ollama backend: the HTTP calls to one Ollama (with ``backends._transport``).

Streams from a plain ``http://`` Ollama go through ``_transport.NDJSONPool``, a
small asyncio-Protocol HTTP/1.1 client that parses chunked NDJSON as bytes
arrive: the benchmark measured httpx's per-chunk stack and pool scans at over
half the gateway's CPU per token, and this path at 2.4x the throughput and a
third of the CPU per token. Everything else (JSON endpoints, ``https://``,
injected test transports) uses one ``httpx.AsyncClient``. Every failure leaves
this module as an exception from ``_exceptions.py`` (``_errors.py`` decides
which, for error answers).

Everything read is bounded: an error body at ``MAX_ERROR_BODY`` bytes (the rest is
not read and the connection is dropped), a JSON answer at ``max_body_bytes``, a
stream line at ``MAX_LINE_BYTES``; every unary call has a time limit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import orjson

from tokenwire.v1 import generation_pb2 as pb

from ..._config import redact_url
from ..._exceptions import (
    CircuitOpen,
    ProtocolError,
    RequestTimeout,
    TruncatedStream,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamUnavailable,
)
from .._base import Decode, Event, StreamRequest
from .._breaker import CircuitBreaker
from .._transport import MAX_LINE_BYTES, NDJSONPool
from ._answers import Chunk, chat_event, embed_response, generate_event, models_from_tags
from ._answers import parse_object as _parse_object
from ._errors import classify_http_error
from ._payloads import chat_payload, embed_payload, generate_payload

__all__ = ["MAX_ERROR_BODY", "OllamaBackend", "is_outage"]

#: Most bytes read of an error answer's body (Ollama's are under 200; a proxy's HTML page
#: or a hostile upstream can be megabytes).
MAX_ERROR_BODY = 64 * 1024


class OllamaBackend:
    """One Ollama server, as a ``backends.Backend``.

    ``connect_timeout`` bounds connection set-up. Stream reads have no httpx timeout
    because the first-token wait and the idle limit are enforced by the relay,
    which knows which phase a stream is in; a unary call (models, embed) is bounded
    as a whole by ``unary_timeout`` (and by the caller's deadline, when shorter).
    """

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
    ) -> None:
        self.name = name
        self.unary_timeout = unary_timeout
        self._max_body = max_body_bytes
        url = httpx.URL(base_url.rstrip("/"))
        # Credentials in the URL become basic auth: the URL itself (in messages and
        # in httpx's own request log) never carries the password.
        auth = httpx.BasicAuth(url.username, url.password) if url.userinfo else None
        self._url = str(url.copy_with(userinfo=b""))
        self.base_url = redact_url(base_url.rstrip("/"))
        self.breaker = breaker or CircuitBreaker(threshold=0, url=self.base_url)
        self._client = httpx.AsyncClient(
            base_url=self._url,
            auth=auth,
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=30.0, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
            headers={"Accept": "application/x-ndjson, application/json"},
            trust_env=False,
        )
        # Streams on plain http:// go through the lean NDJSON client (_transport.py);
        # https:// and injected test transports keep httpx.
        self._lean: NDJSONPool | None = None
        if transport is None and self._url.startswith("http://"):
            authorization = None
            if url.userinfo:
                pair = f"{url.username}:{url.password}".encode()
                authorization = "Basic " + base64.b64encode(pair).decode("ascii")
            self._lean = NDJSONPool(self._url, connect_timeout=connect_timeout,
                                    max_connections=max_connections, where=self.base_url,
                                    authorization=authorization)

    async def aclose(self) -> None:
        if self._lean is not None:
            self._lean.close()
        await self._client.aclose()

    # -- the Backend interface ---------------------------------------------------

    def stream(self, request: StreamRequest
               ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]:
        """Opens a Generate (/api/generate) or Chat (/api/chat) answer."""
        if isinstance(request, pb.GenerateRequest):
            return self.post_stream("/api/generate", generate_payload(request), generate_event)
        return self.post_stream("/api/chat", chat_payload(request), chat_event)

    async def models(self, *, deadline: float | None = None) -> list[pb.Model]:
        """The installed models (/api/tags). ``deadline``: seconds the caller has left,
        when it set a deadline."""
        return models_from_tags(await self._request_json("GET", "/api/tags", deadline=deadline))

    async def embed(self, request: pb.EmbedRequest, *,
                    deadline: float | None = None) -> pb.EmbedResponse:
        body = await self._request_json("POST", "/api/embed", embed_payload(request),
                                        deadline=deadline)
        return embed_response(body, request.model)

    async def probe(self, *, timeout: float) -> None:  # noqa: ASYNC109 - a probe's bound
        await self.version(timeout=timeout)

    async def loaded_models(self, *, timeout: float) -> list[str]:  # noqa: ASYNC109
        """The models loaded in memory now (/api/ps), for routing, which prefers an
        upstream that has the model loaded. Asked after each health probe, never per
        call; like the probe, it goes through an open circuit."""
        body = await self._request_json("GET", "/api/ps", deadline=timeout, probe=True)
        running = body.get("models")
        if not isinstance(running, list):
            raise ProtocolError("Ollama's /api/ps answer has no models list")
        return [str(m.get("name") or m.get("model")) for m in running
                if isinstance(m, dict) and (m.get("name") or m.get("model"))]

    async def version(self, *, timeout: float | None = None) -> str:  # noqa: ASYNC109
        """Returns Ollama's version; doubles as the health probe (which goes
        through even while the circuit is open, and can close it)."""
        body = await self._request_json("GET", "/api/version", deadline=timeout, probe=True)
        return str(body.get("version", ""))

    # -- plain JSON endpoints -------------------------------------------------

    async def _request_json(
        self, method: str, path: str, payload: Chunk | None = None, *,
        deadline: float | None = None, probe: bool = False,
    ) -> Chunk:
        """One JSON request and answer, bounded in time (``unary_timeout``, or the
        caller's ``deadline`` when shorter) and in size."""
        if not probe:
            self.breaker.before_call()
        content = orjson.dumps(payload) if payload is not None else None
        ours = deadline is None or self.unary_timeout <= deadline
        limit = self.unary_timeout if deadline is None else min(self.unary_timeout, deadline)
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                status, body = await self._fetch(method, path, content)
        except TimeoutError:
            raise self._failed(RequestTimeout(
                f"Ollama at {self.base_url} did not answer {path} within {limit:g}s"
                + ("; check that it is not hung, or raise --unary-timeout" if ours
                   else " (the call's deadline)"), outage=ours)) from None
        except UpstreamError as exc:
            raise self._failed(exc) from None
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        if status != 200:
            raise self._failed(classify_http_error(status, body, _model_of(payload), path))
        self.breaker.success()
        return _parse_object(body)

    async def _fetch(self, method: str, path: str, content: bytes | None) -> tuple[int, bytes]:
        """Status and body, the body read up to its bound (an error body to
        MAX_ERROR_BODY; a success body over ``max_body_bytes`` is a ProtocolError)."""
        try:
            async with self._client.stream(method, path, content=content) as response:
                if response.status_code != 200:
                    return response.status_code, await _read_capped(response, MAX_ERROR_BODY)
                body = await _read_capped(response, self._max_body + 1)
                if len(body) > self._max_body:
                    raise ProtocolError(f"Ollama's answer to {path} is larger than "
                                        f"{self._max_body} bytes; ask for less per call")
                return 200, body
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, path) from exc

    def _failed(self, exc: UpstreamError) -> UpstreamError:
        """Tells the breaker about failures that mean "Ollama is not well"."""
        if exc.outage:
            self.breaker.failure()
        elif not isinstance(exc, CircuitOpen):
            self.breaker.success()  # Ollama answered; the request was the problem
        return exc

    # -- streams --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def post_stream(self, path: str, payload: Chunk, decode: Decode
                          ) -> AsyncIterator[AsyncIterator[tuple[Event, int]]]:
        """Opens a streaming request and yields an iterator of (event, line size), each
        line decoded by ``decode``.

        Leaving the ``async with`` block (normally, by error or by cancellation)
        closes the HTTP response; a response closed before its end also closes
        its connection, which is how Ollama learns to stop generating.
        """
        self.breaker.before_call()
        if self._lean is not None:
            lean = self._lean
            try:
                lean_response = await lean.open(path, orjson.dumps(payload), decode)
            except UpstreamError as exc:
                raise self._failed(exc) from None
            except asyncio.CancelledError:
                self.breaker.abandon()
                raise
            try:
                if lean_response.status != 200:
                    body = await lean_response.read_body(MAX_ERROR_BODY)
                    raise self._failed(classify_http_error(lean_response.status, body,
                                                           _model_of(payload), path))
                self.breaker.success()
                try:
                    yield lean_response
                except UpstreamError as exc:
                    raise self._failed(exc) from None
            finally:
                lean.release(lean_response)  # synchronous: nothing a cancel can cut short
            return
        request = self._client.build_request("POST", path, content=orjson.dumps(payload))
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._failed(self._transport_error(exc, path)) from exc
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        try:
            if response.status_code != 200:
                try:
                    body = await _read_capped(response, MAX_ERROR_BODY)
                except httpx.HTTPError as exc:
                    raise self._failed(self._transport_error(exc, path)) from exc
                raise self._failed(
                    classify_http_error(response.status_code, body, _model_of(payload), path))
            self.breaker.success()
            chunks = _iter_events(response, decode, self._transport_error, path)
            async with contextlib.aclosing(chunks):
                try:
                    yield chunks
                except UpstreamError as exc:
                    raise self._failed(exc) from None
        finally:
            # Shielded: a second cancellation must not cut the clean-up short.
            await asyncio.shield(response.aclose())

    def _transport_error(self, exc: httpx.HTTPError, path: str) -> UpstreamError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return UpstreamConnectError(
                f"cannot reach Ollama at {self.base_url} ({type(exc).__name__}: {exc}); "
                "check that Ollama is running there, or point --ollama-url/OLLAMA_HOST at it"
            )
        if isinstance(exc, httpx.PoolTimeout):
            return UpstreamBusy("all upstream connections are busy; retry later")
        if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
            return UpstreamDisconnected(
                f"Ollama at {self.base_url} closed the connection during {path} "
                f"({type(exc).__name__}); the answer is incomplete"
            )
        return UpstreamUnavailable(
            f"request to Ollama at {self.base_url}{path} failed ({type(exc).__name__}: {exc})"
        )


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the body; the rest is left unread (closing the
    response then drops the connection instead of draining it)."""
    body = bytearray()
    async for data in response.aiter_bytes():
        body += data
        if len(body) >= limit:
            break
    return bytes(body[:limit])


async def _iter_events(
    response: httpx.Response,
    decode: Decode,
    transport_error: Any,
    path: str,
) -> AsyncGenerator[tuple[Event, int], None]:
    """Splits the body into lines and decodes each once; yields each event with the
    size of its line in bytes.

    Ends normally only after the final event; an ``{"error": ...}`` line, a dropped
    connection or EOF without a final event raise.
    """
    pending = b""
    done = False
    try:
        async for data in response.aiter_bytes():
            if pending:
                data = pending + data
            start = 0
            while (end := data.find(b"\n", start)) != -1:
                line = data[start:end]
                start = end + 1
                if line.strip():
                    event = decode(line)
                    done = event[3] is not None
                    yield event, len(line)
            pending = data[start:]
            if len(pending) > MAX_LINE_BYTES:
                raise ProtocolError(f"Ollama sent a line longer than {MAX_LINE_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise transport_error(exc, path) from exc
    if pending.strip():
        # A plain JSON body (load/unload answers) has no trailing newline.
        event = decode(pending)
        done = event[3] is not None
        yield event, len(pending)
    if not done:
        raise TruncatedStream(
            "Ollama ended the stream without a final (done) message; the answer is incomplete"
        )


def is_outage(exc: UpstreamError) -> bool:
    """Failures that say Ollama (not the request) is in trouble; these count
    towards the circuit breaker and may be retried before the first token."""
    return exc.outage


def _model_of(payload: Chunk | None) -> str:
    return str(payload.get("model", "")) if payload else ""
