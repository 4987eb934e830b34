"""Exceptions raised by the upstream adapter.

The adapter turns every httpx, HTTP and NDJSON failure into one of these; the
servicer never sees httpx exceptions. ``_status.py`` maps the tree to gRPC
status codes in one table.

    UpstreamError                 anything that went wrong talking to the engine
    ├── UpstreamUnavailable       the engine could not take the request (retryable)
    │   ├── UpstreamConnectError    no connection (refused, DNS, TLS, connect timeout)
    │   ├── UpstreamBusy            the engine said 503: its queue is full
    │   └── CircuitOpen             failing fast after repeated failures
    ├── UpstreamTimeout           the engine went quiet
    │   ├── FirstTokenTimeout       nothing arrived within the first-token wait
    │   └── IdleTimeout             a gap between two chunks exceeded the idle limit
    ├── ModelNotFound             the model is not installed (404)
    ├── InvalidRequest            the engine rejected the request's content (400, some 500s)
    ├── PermissionDenied          the engine refused the caller (401/403)
    ├── StreamError               an ``{"error": ...}`` line inside a 200 stream
    │   └── RunnerCrashed           ... saying the model runner died (retryable)
    ├── TruncatedStream           the stream ended without ``done`` and without an error line
    │   └── UpstreamDisconnected    ... because the connection dropped (retryable)
    ├── ProtocolError             a body that is not the JSON/NDJSON we expect
    └── EngineError               any other engine failure (500 and friends)
"""

from __future__ import annotations

__all__ = [
    "CircuitOpen",
    "EngineError",
    "FirstTokenTimeout",
    "IdleTimeout",
    "InvalidRequest",
    "ModelNotFound",
    "PermissionDenied",
    "ProtocolError",
    "RunnerCrashed",
    "StreamError",
    "TruncatedStream",
    "UpstreamBusy",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class UpstreamError(Exception):
    """Base class. ``message`` is safe to show to callers (no prompt text)."""

    def __init__(self, message: str, *, http_status: int | None = None, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        #: Request field the error is about, when known (for BadRequest details).
        self.field = field


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamConnectError(UpstreamUnavailable):
    pass


class UpstreamBusy(UpstreamUnavailable):
    pass


class CircuitOpen(UpstreamUnavailable):
    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamTimeout(UpstreamError):
    pass


class FirstTokenTimeout(UpstreamTimeout):
    pass


class IdleTimeout(UpstreamTimeout):
    pass


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
    pass


class TruncatedStream(UpstreamError):
    pass


class UpstreamDisconnected(TruncatedStream):
    pass


class ProtocolError(UpstreamError):
    pass


class EngineError(UpstreamError):
    pass
