"""What every HTTP engine backend shares: a bounded JSON client, streams on the lean
transport, and the circuit breaker's bookkeeping.

A backend subclasses ``HTTPEngine`` and gives its wire format: ``classify`` (an error
answer as our exception), and its payloads and decoders. Everything read is bounded:
an error body at ``MAX_ERROR_BODY`` bytes (the rest is not read and the connection is
dropped), a JSON answer at ``max_body_bytes``, a stream frame at
``_transport.MAX_LINE_BYTES``; every unary call has a time limit (``unary_timeout``,
or the caller's deadline when shorter).

Streams go through ``_transport.StreamPool`` on http:// and https://; JSON calls, and
streams through an injected httpx transport (tests), use one ``httpx.AsyncClient``.
Only failures that are outages move the breaker; an engine that answered and
refused the request closes it again (it is alive).

With tracing on, a request made for a model call carries the ``traceparent`` of the
call's GenAI span (``tracing.generation_var``); with it off, that is one context
variable read per request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import orjson

from .._config import redact_url
from .._exceptions import (
    CircuitOpen,
    ProtocolError,
    RequestTimeout,
    TruncatedStream,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamUnavailable,
)
from ..tracing import generation_var
from ._base import Event
from ._breaker import CircuitBreaker
from ._transport import _FRAMERS, Framing, StreamPool

__all__ = ["MAX_ERROR_BODY", "HTTPEngine", "Headers", "JSON"]

#: Most bytes read of an error answer's body (an engine's are under 200; a proxy's HTML
#: page or a hostile upstream can be megabytes).
MAX_ERROR_BODY = 64 * 1024
#: One JSON object as an engine takes or gives it.
JSON = dict[str, Any]
#: An answer's headers, lowercase names.
Headers = dict[str, str]


class HTTPEngine:
    """One engine behind an HTTP API. ``connect_timeout`` bounds connection set-up;
    stream reads have no timeout here (the relay enforces the first-token wait and
    the idle limit, knowing which phase a stream is in)."""

    #: How messages name the engine ("Ollama", "the OpenAI-compatible engine").
    engine = "the engine"
    #: What to check when it cannot be reached.
    hint = "check that it is running there and that its URL is right"
    #: The wire protocol, as traces name it (``gen_ai.provider.name``).
    provider = "_OTHER"

    def __init__(
        self,
        base_url: str,
        *,
        name: str,
        connect_timeout: float = 5.0,
        max_connections: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker: CircuitBreaker | None = None,
        unary_timeout: float = 120.0,
        max_body_bytes: int = 128 << 20,
        ssl_context: ssl.SSLContext | None = None,
        headers: dict[str, str] | None = None,
        accept: str = "application/json",
    ) -> None:
        self.name = name
        self.unary_timeout = unary_timeout
        self._max_body = max_body_bytes
        url = httpx.URL(base_url.rstrip("/"))
        headers = dict(headers or {})
        if url.userinfo:
            # Credentials in the URL become basic auth: the URL itself (in messages and
            # in httpx's own request log) never carries the password.
            pair = f"{url.username}:{url.password}".encode()
            headers.setdefault("Authorization",
                               "Basic " + base64.b64encode(pair).decode("ascii"))
        self._url = str(url.copy_with(userinfo=b""))
        self._host = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self.base_url = redact_url(base_url.rstrip("/"))
        self.breaker = breaker or CircuitBreaker(threshold=0, url=self.base_url)
        self._client = httpx.AsyncClient(
            base_url=self._url,
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=30.0, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
            verify=ssl_context or True,
            headers={"Accept": accept, **headers},
            trust_env=False,
        )
        self._lean: StreamPool | None = None
        if transport is None:
            self._lean = StreamPool(self._url, connect_timeout=connect_timeout,
                                    max_connections=max_connections, where=self.base_url,
                                    headers=headers, ssl_context=ssl_context,
                                    engine=self.engine, hint=self.hint)

    async def aclose(self) -> None:
        if self._lean is not None:
            self._lean.close()
        await self._client.aclose()

    def classify(self, status: int, body: bytes, headers: Headers, model: str,
                 path: str) -> UpstreamError:
        """An error answer (status other than 200) as one of our exceptions."""
        raise NotImplementedError

    # -- JSON calls -------------------------------------------------------------------

    async def request_json(
        self, method: str, path: str, payload: JSON | None = None, *,
        deadline: float | None = None, probe: bool = False,
    ) -> JSON:
        """One JSON request and answer, bounded in time (``unary_timeout``, or the
        caller's ``deadline`` in seconds when shorter) and in size. A ``probe`` goes
        through an open circuit (and can close it)."""
        if not probe:
            self.breaker.before_call()
        content = orjson.dumps(payload) if payload is not None else None
        ours = deadline is None or self.unary_timeout <= deadline
        limit = self.unary_timeout if deadline is None else min(self.unary_timeout, deadline)
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                status, body, headers = await self._fetch(method, path, content)
        except TimeoutError:
            raise self._failed(RequestTimeout(
                f"{self.engine} at {self.base_url} did not answer {path} within {limit:g}s"
                + ("; check that it is not hung, or raise --unary-timeout" if ours
                   else " (the call's deadline)"), outage=ours)) from None
        except UpstreamError as exc:
            raise self._failed(exc) from None
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        if status != 200:
            raise self._failed(self.classify(status, body, headers, _model_of(payload), path))
        self.breaker.success()
        return self._parse(body)

    def _parse(self, raw: bytes) -> JSON:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"{self.engine} sent a body that is not JSON ({exc})") from exc
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.engine} sent JSON that is not an object")
        return value

    async def _fetch(self, method: str, path: str,
                     content: bytes | None) -> tuple[int, bytes, Headers]:
        """Status, body and headers, the body read up to its bound (an error body to
        MAX_ERROR_BODY; a success body over ``max_body_bytes`` is a ProtocolError)."""
        try:
            headers = {"Content-Type": "application/json"} if content is not None else {}
            headers.update(self._trace_headers())
            async with self._client.stream(method, path, content=content,
                                           headers=headers) as response:
                got = dict(response.headers)
                if response.status_code != 200:
                    return (response.status_code,
                            await _read_capped(response, MAX_ERROR_BODY), got)
                body = await _read_capped(response, self._max_body + 1)
                if len(body) > self._max_body:
                    raise ProtocolError(f"{self.engine}'s answer to {path} is larger than "
                                        f"{self._max_body} bytes; ask for less per call")
                return 200, body, got
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, path) from exc

    def _trace_headers(self) -> dict[str, str]:
        """The headers that carry the current model call's trace upstream (none when
        tracing is off or this is no model call's request)."""
        gen = generation_var.get()
        if gen is None:
            return {}
        return gen.upstream(self.provider, self._host, self._port, self.name)

    def _failed(self, exc: UpstreamError) -> UpstreamError:
        """Tells the breaker about failures that mean "the engine is not well"."""
        if exc.outage:
            self.breaker.failure()
        elif not isinstance(exc, CircuitOpen):
            self.breaker.success()  # the engine answered; the request was the problem
        return exc

    # -- streams --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def post_stream(self, path: str, payload: JSON, framing: Framing, *,
                          accept: bytes = b"application/x-ndjson, application/json",
                          ) -> AsyncIterator[AsyncIterator[tuple[Event, int]]]:
        """Opens a streaming request; yields what iterates (event, frame size), each
        frame cut and decoded as ``framing`` says.

        Leaving the ``async with`` block (normally, by error or by cancellation)
        closes the HTTP response; a response closed before its end also closes
        its connection, which is how the engine learns to stop generating.
        """
        self.breaker.before_call()
        body = orjson.dumps(payload)
        trace = self._trace_headers()
        if self._lean is not None:
            lean = self._lean
            try:
                lean_response = await lean.open(
                    path, body, framing, accept=accept,
                    headers=b"".join(f"{k}: {v}\r\n".encode("latin-1")
                                     for k, v in trace.items()) if trace else b"")
            except UpstreamError as exc:
                raise self._failed(exc) from None
            except asyncio.CancelledError:
                self.breaker.abandon()
                raise
            try:
                if lean_response.status != 200:
                    error = await lean_response.read_body(MAX_ERROR_BODY)
                    headers = {k.decode("latin-1"): v.decode("latin-1")
                               for k, v in lean_response.headers.items()}
                    raise self._failed(self.classify(lean_response.status, error, headers,
                                                     _model_of(payload), path))
                self.breaker.success()
                try:
                    yield lean_response
                except UpstreamError as exc:
                    raise self._failed(exc) from None
            finally:
                lean.release(lean_response)  # synchronous: nothing a cancel can cut short
            return
        request = self._client.build_request("POST", path, content=body,
                                             headers={"Accept": accept.decode(), **trace})
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
                    error = await _read_capped(response, MAX_ERROR_BODY)
                except httpx.HTTPError as exc:
                    raise self._failed(self._transport_error(exc, path)) from exc
                raise self._failed(self.classify(response.status_code, error,
                                                 dict(response.headers), _model_of(payload),
                                                 path))
            self.breaker.success()
            events = _iter_events(response, framing, self._transport_error, path)
            async with contextlib.aclosing(events):
                try:
                    yield events
                except UpstreamError as exc:
                    raise self._failed(exc) from None
        finally:
            # Shielded: a second cancellation must not cut the clean-up short.
            await asyncio.shield(response.aclose())

    def _transport_error(self, exc: httpx.HTTPError, path: str) -> UpstreamError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return UpstreamConnectError(
                f"cannot reach {self.engine} at {self.base_url} ({type(exc).__name__}: "
                f"{exc}); {self.hint}")
        if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
            return UpstreamDisconnected(
                f"{self.engine} at {self.base_url} closed the connection during {path} "
                f"({type(exc).__name__}); the answer is incomplete")
        return UpstreamUnavailable(
            f"request to {self.engine} at {self.base_url}{path} failed "
            f"({type(exc).__name__}: {exc})")


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the body; the rest is left unread (closing the
    response then drops the connection instead of draining it)."""
    body = bytearray()
    async for data in response.aiter_bytes():
        body += data
        if len(body) >= limit:
            break
    return bytes(body[:limit])


async def _iter_events(response: httpx.Response, framing: Framing, transport_error: Any,
                       path: str) -> AsyncGenerator[tuple[Event, int], None]:
    """The pull path (httpx): the body cut into frames by the same framers as the lean
    transport, each decoded once. Ends normally only after the final event; a dropped
    connection or an end without a final event raise."""
    got: list[tuple[Event, int]] = []
    framer = _FRAMERS[framing[0]](framing[1], lambda event, size: got.append((event, size)))
    done = False
    failed: UpstreamError | None = None
    try:
        async for data in response.aiter_bytes():
            try:
                framer.feed(data)
            except UpstreamError as exc:
                failed = exc  # after the events decoded before it
            for item in got:
                done = item[0][3] is not None
                yield item
            got.clear()
            if failed is not None:
                raise failed
    except httpx.HTTPError as exc:
        raise transport_error(exc, path) from exc
    framer.end()
    for item in got:
        done = item[0][3] is not None
        yield item
    if not done:
        raise TruncatedStream("the engine ended the stream without a final message; the "
                              "answer is incomplete")


def _model_of(payload: JSON | None) -> str:
    return str(payload.get("model", "")) if payload else ""
