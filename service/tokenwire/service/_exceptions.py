"""Exceptions raised by the upstream adapter.

The adapter turns every httpx, HTTP and NDJSON failure into one of these; the
servicer never sees httpx exceptions. ``_status.py`` maps the tree to gRPC
status codes in one table.

Each instance says whether it is an *outage* (``outage``): a sign that the
engine is not well (no connection, 503, a crashed runner, a dropped connection,
a proxy's 502/504 page, no answer within the server's own time limit). Only
outages count towards the circuit breaker and are retried before the first
token. An engine that answers and refuses this one request, whatever its words,
is alive: that is never an outage. The class sets the default; the classifier
decides for the cases a class alone cannot (an ``EngineError`` from a live
engine or from a dead one behind a proxy). ``retryable`` says whether trying
again (after ``retry_after`` seconds when the engine named a wait, or on
another upstream) may succeed before the first token: every outage, and a rate
limit, which is not an outage.

Messages are bounded (``MAX_MESSAGE_BYTES``): an upstream can put megabytes
into an error, and a status message travels in HTTP/2 trailers.

    UpstreamError                 anything that went wrong talking to the engine
    ├── UpstreamUnavailable       the engine could not take the request (retryable)
    │   ├── UpstreamConnectError    no connection (refused, DNS, TLS, connect timeout)
    │   ├── UpstreamBusy            the engine said 503: its queue is full
    │   └── CircuitOpen             failing fast after repeated failures
    ├── UpstreamRateLimited       the engine said 429: slow down (retryable, no outage)
    │   └── QuotaExhausted          ... because the account's quota is spent (not retryable)
    ├── UpstreamTimeout           the engine went quiet
    │   ├── FirstTokenTimeout       nothing arrived within the first-token wait
    │   ├── IdleTimeout             a gap between two chunks exceeded the idle limit
    │   └── RequestTimeout          a unary call (models, embed) got no answer in time
    ├── ModelNotFound             the model is not installed (404)
    ├── InvalidRequest            the engine rejected the request's content (400, some 500s)
    ├── PermissionDenied          the engine refused the caller (401/403)
    ├── StreamError               an ``{"error": ...}`` line inside a 200 stream
    │   └── RunnerCrashed           ... saying the model runner died (retryable)
    ├── TruncatedStream           the stream ended without ``done`` and without an error line
    │   └── UpstreamDisconnected    ... because the connection dropped (retryable)
    ├── ProtocolError             a body that is not the JSON/NDJSON we expect, or values
    │                               out of range or of the wrong type
    └── EngineError               any other engine failure (500 and friends)
"""

from __future__ import annotations

__all__ = [
    "MAX_MESSAGE_BYTES",
    "CircuitOpen",
    "EngineError",
    "FirstTokenTimeout",
    "IdleTimeout",
    "InvalidRequest",
    "ModelNotFound",
    "PermissionDenied",
    "ProtocolError",
    "QuotaExhausted",
    "RequestTimeout",
    "RunnerCrashed",
    "StreamError",
    "TruncatedStream",
    "UpstreamBusy",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "excerpt",
]

#: Longest message an exception carries, in UTF-8 bytes (it becomes grpc-message and
#: the google.rpc.Status message, both in trailers that clients cap at 8 KiB by default).
MAX_MESSAGE_BYTES = 1024


def excerpt(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character boundary, marked as
    cut (with the full size) when it was longer."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    marker = f" ... [cut: {len(raw)} bytes in all]"
    keep = raw[:max(limit - len(marker), 0)].decode("utf-8", "ignore")
    return keep + marker


class UpstreamError(Exception):
    """Base class. ``message`` is safe to show to callers (no prompt text) and at most
    ``MAX_MESSAGE_BYTES`` long."""

    #: Default of ``outage`` for the class.
    outage_by_default = False
    #: Seconds the engine asked to wait before trying again, when it said.
    retry_after: float | None = None

    def __init__(self, message: str, *, http_status: int | None = None, field: str = "",
                 outage: bool | None = None) -> None:
        message = excerpt(message)
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        #: Request field the error is about, when known (for BadRequest details).
        self.field = field
        #: The engine is not well (see the module docstring): counts towards the breaker
        #: and may be retried before the first token.
        self.outage = self.outage_by_default if outage is None else outage

    @property
    def retryable(self) -> bool:
        """Trying again (later, or elsewhere) may succeed before the first token."""
        return self.outage


class UpstreamUnavailable(UpstreamError):
    outage_by_default = True


class UpstreamConnectError(UpstreamUnavailable):
    pass


class UpstreamBusy(UpstreamUnavailable):
    pass


class CircuitOpen(UpstreamUnavailable):
    outage_by_default = False  # the breaker's own answer: nothing new about the engine

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRateLimited(UpstreamError):
    """HTTP 429: the engine (or a proxy in front) limits how fast this gateway may
    call. Not an outage; retryable after ``retry_after``, or on another upstream."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 http_status: int | None = 429) -> None:
        super().__init__(message, http_status=http_status)
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return True


class QuotaExhausted(UpstreamRateLimited):
    """HTTP 429 that says the account's quota (credits, billing) is spent: waiting a
    few seconds does not help, so not retryable (and no wait is suggested)."""

    def __init__(self, message: str, *, http_status: int | None = 429) -> None:
        super().__init__(message, retry_after=None, http_status=http_status)

    @property
    def retryable(self) -> bool:
        return False


class UpstreamTimeout(UpstreamError):
    pass


class FirstTokenTimeout(UpstreamTimeout):
    pass


class IdleTimeout(UpstreamTimeout):
    pass


class RequestTimeout(UpstreamTimeout):
    """An outage when the server's own limit fired, not when the caller's deadline did."""


class ModelNotFound(UpstreamError):
    def __init__(self, model: str, message: str, *, http_status: int | None = 404) -> None:
        super().__init__(message, http_status=http_status, field="model")
        self.model = model


class InvalidRequest(UpstreamError):
    pass


class PermissionDenied(UpstreamError):
    pass


class StreamError(UpstreamError):
    pass


class RunnerCrashed(StreamError):
    outage_by_default = True


class TruncatedStream(UpstreamError):
    pass


class UpstreamDisconnected(TruncatedStream):
    outage_by_default = True


class ProtocolError(UpstreamError):
    pass


class EngineError(UpstreamError):
    pass
