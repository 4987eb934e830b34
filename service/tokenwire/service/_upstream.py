"""The Ollama adapter: the only module (with ``_ndjson.py``) that speaks HTTP.

Streams from a plain ``http://`` Ollama go through ``_ndjson.NDJSONPool``, a
small asyncio-Protocol HTTP/1.1 client that parses chunked NDJSON as bytes
arrive: the benchmark measured httpx's per-chunk stack and pool scans at over
half the gateway's CPU per token, and this path at 2.4x the throughput and a
third of the CPU per token. Everything else (JSON endpoints, ``https://``,
injected test transports) uses one ``httpx.AsyncClient``. Every failure leaves
this module as an exception from ``_exceptions.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import orjson

from ._breaker import CircuitBreaker
from ._config import redact_url
from ._exceptions import (
    CircuitOpen,
    EngineError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    ProtocolError,
    RunnerCrashed,
    StreamError,
    TruncatedStream,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamUnavailable,
)
from ._ndjson import MAX_LINE_BYTES, NDJSONPool

__all__ = ["Chunk", "OllamaUpstream", "classify_http_error", "is_outage"]

#: One parsed NDJSON object from Ollama.
Chunk = dict[str, Any]


_RUNNER_DIED = (
    "model runner has unexpectedly stopped",
    "an error was encountered while running the model",
)


class OllamaUpstream:
    """Talks to one Ollama server.

    ``connect_timeout`` bounds connection set-up; reads have no httpx timeout
    because the first-token wait and the idle limit are enforced by the relay,
    which knows which phase a stream is in.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        max_connections: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
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
        # Streams on plain http:// go through the lean NDJSON client (_ndjson.py);
        # https:// and injected test transports keep httpx.
        self._lean: NDJSONPool | None = None
        if transport is None and self._url.startswith("http://"):
            authorization = None
            if url.userinfo:
                pair = f"{url.username}:{url.password}".encode()
                authorization = "Basic " + base64.b64encode(pair).decode("ascii")
            self._lean = NDJSONPool(self._url, connect_timeout=connect_timeout,
                                    max_connections=max_connections, parse_line=_parse_line,
                                    where=self.base_url, authorization=authorization)

    async def aclose(self) -> None:
        if self._lean is not None:
            self._lean.close()
        await self._client.aclose()

    # -- plain JSON endpoints -------------------------------------------------

    async def version(self, *, timeout: float | None = None) -> str:  # noqa: ASYNC109
        """Returns Ollama's version; doubles as the liveness probe (which goes
        through even while the circuit is open, and can close it)."""
        body = await self._request_json("GET", "/api/version", timeout=timeout, probe=True)
        return str(body.get("version", ""))

    async def tags(self) -> Chunk:
        return await self._request_json("GET", "/api/tags")

    async def embed(self, payload: Chunk) -> Chunk:
        return await self._request_json("POST", "/api/embed", payload)

    async def _request_json(
        self, method: str, path: str, payload: Chunk | None = None, *,
        timeout: float | None = None,  # noqa: ASYNC109 - httpx's own per-request timeout
        probe: bool = False,
    ) -> Chunk:
        if not probe:
            self.breaker.before_call()
        content = orjson.dumps(payload) if payload is not None else None
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = await self._client.request(method, path, content=content, **extra)
        except httpx.HTTPError as exc:
            raise self._failed(self._transport_error(exc, path)) from exc
        if response.status_code != 200:
            raise self._failed(
                classify_http_error(response.status_code, response.content, _model_of(payload)))
        self.breaker.success()
        return _parse_object(response.content)

    def _failed(self, exc: UpstreamError) -> UpstreamError:
        """Tells the breaker about failures that mean "Ollama is not well"."""
        if is_outage(exc):
            self.breaker.failure()
        else:
            self.breaker.success()  # Ollama answered; the request was the problem
        return exc

    # -- streams --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def stream(self, path: str, payload: Chunk) -> AsyncIterator[AsyncIterator[Chunk]]:
        """Opens a streaming request and yields an iterator of parsed chunks.

        Leaving the ``async with`` block (normally, by error or by cancellation)
        closes the HTTP response; a response closed before its end also closes
        its connection, which is how Ollama learns to stop generating.
        """
        self.breaker.before_call()
        if self._lean is not None:
            lean = self._lean
            try:
                lean_response = await lean.open(path, orjson.dumps(payload))
            except UpstreamError as exc:
                raise self._failed(exc) from None
            except asyncio.CancelledError:
                self.breaker.abandon()
                raise
            try:
                if lean_response.status != 200:
                    body = await lean_response.read_body()
                    raise self._failed(classify_http_error(lean_response.status, body,
                                                           _model_of(payload)))
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
                    body = await response.aread()
                except httpx.HTTPError as exc:
                    raise self._failed(self._transport_error(exc, path)) from exc
                raise self._failed(
                    classify_http_error(response.status_code, body, _model_of(payload)))
            self.breaker.success()
            chunks = _iter_chunks(response, self._transport_error, path)
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


async def _iter_chunks(
    response: httpx.Response,
    transport_error: Any,
    path: str,
) -> AsyncGenerator[Chunk, None]:
    """Splits the body into lines and parses each once.

    Ends normally only after a ``done: true`` object; an ``{"error": ...}``
    line, a dropped connection or EOF without ``done`` raise.
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
                    chunk = _parse_line(line)
                    done = chunk.get("done") is True
                    yield chunk
            pending = data[start:]
            if len(pending) > MAX_LINE_BYTES:
                raise ProtocolError(f"Ollama sent a line longer than {MAX_LINE_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise transport_error(exc, path) from exc
    if pending.strip():
        # A plain JSON body (load/unload answers) has no trailing newline.
        chunk = _parse_line(pending)
        done = chunk.get("done") is True
        yield chunk
    if not done:
        raise TruncatedStream(
            "Ollama ended the stream without a final (done) message; the answer is incomplete"
        )


def is_outage(exc: UpstreamError) -> bool:
    """Failures that say Ollama (not the request) is in trouble; these count
    towards the circuit breaker and may be retried before the first token."""
    if isinstance(exc, CircuitOpen):
        return False
    return isinstance(exc, UpstreamUnavailable | RunnerCrashed | UpstreamDisconnected) or (
        isinstance(exc, EngineError) and (exc.http_status or 500) >= 500)


def _parse_line(line: bytes) -> Chunk:
    chunk = _parse_object(line)
    error = chunk.get("error")
    if error is not None:
        message = str(error)
        if any(marker in message for marker in _RUNNER_DIED):
            raise RunnerCrashed(f"Ollama's model runner failed mid-stream: {message}")
        raise StreamError(f"Ollama reported an error mid-stream: {message}")
    return chunk


def _parse_object(raw: bytes) -> Chunk:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"Ollama sent a body that is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ProtocolError("Ollama sent JSON that is not an object")
    return value


def _model_of(payload: Chunk | None) -> str:
    return str(payload.get("model", "")) if payload else ""


def _error_text(body: bytes) -> str:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()
    if isinstance(value, dict) and "error" in value:
        return str(value["error"])
    return body.decode("utf-8", "replace").strip()


def classify_http_error(status: int, body: bytes, model: str) -> UpstreamError:
    """Turns a non-200 answer from Ollama into an exception, by status and text."""
    text = _error_text(body)
    if status == 404 and "not found" in text and text.startswith("model"):
        return ModelNotFound(
            model,
            f"model '{model}' is not installed in Ollama; pull it first "
            f"(`ollama pull {model}`) or choose one listed by ListModels",
            http_status=status,
        )
    if status == 404:
        return EngineError(
            f"Ollama answered 404 ({text or 'no body'}); is --ollama-url pointing at Ollama?",
            http_status=status,
        )
    if status == 400:
        return InvalidRequest(f"Ollama rejected the request: {text}", http_status=status,
                              field=_field_of(text))
    if status == 500 and (text.startswith(('option "', "invalid format"))):
        # Ollama reports these request errors as 500; they are the caller's to fix.
        return InvalidRequest(f"Ollama rejected the request: {text}", http_status=status,
                              field=_field_of(text))
    if status in (401, 403):
        return PermissionDenied(
            f"Ollama refused the request with HTTP {status}"
            + (f": {text}" if text else " (on a loopback bind, Ollama checks the Host header)"),
            http_status=status,
        )
    if status == 503:
        return UpstreamBusy(f"Ollama is busy ({text}); retry later", http_status=status)
    if any(marker in text for marker in _RUNNER_DIED):
        return RunnerCrashed(f"Ollama's model runner failed: {text}", http_status=status)
    return EngineError(f"Ollama failed with HTTP {status}: {text or 'no body'}",
                       http_status=status)


def _field_of(text: str) -> str:
    if text.startswith('option "'):
        return "options." + text.split('"', 2)[1]
    for marker, field in (
        ("invalid format", "format"),
        ("support thinking", "think"),
        ("invalid think", "think"),
        ("support tools", "tools"),
        ("support vision", "images"),
        ("base64", "images"),
        ("raw mode", "raw"),
        ("support insert", "suffix"),
        ("context length", "prompt"),
    ):
        if marker in text:
            return field
    return ""
