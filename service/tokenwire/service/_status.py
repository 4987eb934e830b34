"""The one place where failures become gRPC statuses.

``STATUS_TABLE`` maps each exception class to a status code and an ErrorInfo
reason; ``map_errors`` applies it to a handler. Details travel as
google.rpc.Status (grpcio-status): ErrorInfo always, BadRequest for invalid
fields, ResourceInfo for a missing model, RetryInfo when a retry may succeed.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ._exceptions import (
    CircuitOpen,
    EngineError,
    FirstTokenTimeout,
    IdleTimeout,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    ProtocolError,
    QuotaExhausted,
    RequestTimeout,
    RunnerCrashed,
    StreamError,
    TruncatedStream,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
    excerpt,
)
from ._validate import ValidationFailed
from .guard._admission import Overloaded
from .guard._auth import NotAllowed, NotAuthenticated
from .guard._budget import BudgetExceeded
from .guard._gate import LimitsUnavailable
from .guard._http2 import MetadataTooLarge
from .orca import load_trailer
from .resume._errors import (
    PositionOutOfRange,
    ReplayedStatus,
    ResumeError,
    ResumeUnavailable,
    RetentionFull,
    StoreUnavailable,
    StreamCancelled,
    StreamNotFound,
    StreamTooLarge,
)

__all__ = ["DOMAIN", "STATUS_TABLE", "InitialMetadata", "ResponseTooLarge", "ShuttingDown",
           "Undecodable", "error_reason_var", "initial_metadata_var", "map_errors", "reason_of",
           "request_id_trailer", "request_id_var", "send_early_metadata", "send_initial_metadata",
           "status_for"]


class InitialMetadata:
    """A call's initial metadata (``x-request-id``), sent once, before the call's first
    response message. When tokenwire's own calls send it is ``--initial-metadata``'s choice:

    - ``first-token`` (``early=False``): with the first message (a model call's first
      Token, a unary call's answer), and not at all when the call fails before it: the
      status then goes out alone (trailers-only, ``x-request-id`` in the trailers). gRPC
      clients commit a call when headers arrive, so only this lets their retry policy send
      a call that failed before its first token (a replica without an engine) to another
      replica.
    - ``early``: a model call's as soon as its upstream request is under way, so the two
      overlap, any other call's at once, and before any error status. No client retry can
      follow.

    Health and reflection calls send it at once."""

    __slots__ = ("_pairs", "_sent", "early")

    def __init__(self, pairs: tuple[tuple[str, str], ...], *, early: bool = True) -> None:
        self._pairs = pairs
        self._sent = False
        self.early = early

    async def send(self, context: grpc.aio.ServicerContext) -> None:
        if not self._sent:
            self._sent = True
            await context.send_initial_metadata(self._pairs)

    async def send_early(self, context: grpc.aio.ServicerContext) -> None:
        """Sends it now if this call's headers go early (before a status, or while the
        upstream request is made); in the first-token order, nothing."""
        if self.early:
            await self.send(context)


initial_metadata_var: contextvars.ContextVar[InitialMetadata | None] = contextvars.ContextVar(
    "tokenwire_initial_metadata", default=None)


async def send_initial_metadata(context: grpc.aio.ServicerContext) -> None:
    """Sends the call's initial metadata unless that was done already (before a first
    response message)."""
    pending = initial_metadata_var.get()
    if pending is not None:
        await pending.send(context)


async def send_early_metadata(context: grpc.aio.ServicerContext) -> None:
    """Sends the call's initial metadata where the early order sends it (see
    ``InitialMetadata``): while the upstream request is made, and before an error status."""
    pending = initial_metadata_var.get()
    if pending is not None:
        await pending.send_early(context)


class ShuttingDown(Exception):
    """The server's grace period ended while this call was still running."""

    message = ("the server is shutting down and its grace period ended; retry, another "
               "instance will take the call")

class ResponseTooLarge(Exception):
    """An answer that would be over ``--max-message-bytes`` as one message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

class Undecodable(Exception):
    """The request bytes are not a message of the method's request type (bad wire
    format, bad UTF-8 in a string, nesting past protobuf's limit): the caller's
    mistake, so INVALID_ARGUMENT, never grpc.aio's UNKNOWN with a traceback."""

    def __init__(self, cause: BaseException) -> None:
        detail = str(cause) or type(cause).__name__
        self.message = (f"the request could not be decoded: {detail}; send one serialized "
                        "request message of the method's type (as a client generated from "
                        "the .proto files does)")
        super().__init__(self.message)


DOMAIN = "tokenwire.dev"
#: Longest status message, in UTF-8 bytes (it travels twice in the trailers).
MAX_STATUS_MESSAGE = 2048
#: Violations sent back at most: the status travels in trailers (8 KiB by default).
MAX_VIOLATIONS = 20
log = logging.getLogger("tokenwire.service")

#: The current call's request id (set by the request interceptor).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: The ErrorInfo reason of the status the current call failed with (for the metrics).
error_reason_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tokenwire_error_reason", default=None)

# Most specific classes first; the first match wins. (code, reason, retry after seconds)
STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode, str, float | None], ...] = (
    (ValidationFailed, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", None),
    (Undecodable, grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_REQUEST", None),
    (NotAuthenticated, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", None),
    (NotAllowed, grpc.StatusCode.PERMISSION_DENIED, "NOT_ALLOWED", None),
    (BudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOKEN_BUDGET_EXHAUSTED", None),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", 1.0),
    (LimitsUnavailable, grpc.StatusCode.UNAVAILABLE, "LIMITS_STORE_UNAVAILABLE", 1.0),
    (MetadataTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, "METADATA_TOO_LARGE", None),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", 1.0),
    (ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE", None),
    (StreamNotFound, grpc.StatusCode.NOT_FOUND, "STREAM_NOT_FOUND", None),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE, "RESUME_STORE_UNAVAILABLE", 1.0),
    (RetentionFull, grpc.StatusCode.RESOURCE_EXHAUSTED, "RESUME_BUFFERS_FULL", 1.0),
    (StreamTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, "RESUME_STREAM_TOO_LARGE", None),
    (StreamCancelled, grpc.StatusCode.CANCELLED, "STREAM_CANCELLED", None),
    (PositionOutOfRange, grpc.StatusCode.OUT_OF_RANGE, "RESUME_OUT_OF_RANGE", None),
    (ResumeUnavailable, grpc.StatusCode.FAILED_PRECONDITION, "RESUME_UNAVAILABLE", None),
    (CircuitOpen, grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN", 1.0),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", None),
    (QuotaExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_QUOTA_EXHAUSTED", None),
    (UpstreamRateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", 1.0),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", None),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_FORBIDDEN", None),
    (UpstreamConnectError, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE", 1.0),
    (UpstreamBusy, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BUSY", 1.0),
    (UpstreamUnavailable, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", 1.0),
    (FirstTokenTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, "FIRST_TOKEN_TIMEOUT", None),
    (IdleTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, "IDLE_TIMEOUT", None),
    (RequestTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", None),
    (RunnerCrashed, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_RUNNER_FAILED", 1.0),
    (StreamError, grpc.StatusCode.INTERNAL, "UPSTREAM_STREAM_ERROR", None),
    (UpstreamDisconnected, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_DISCONNECTED", 1.0),
    (TruncatedStream, grpc.StatusCode.INTERNAL, "UPSTREAM_TRUNCATED", None),
    (ProtocolError, grpc.StatusCode.INTERNAL, "UPSTREAM_PROTOCOL_ERROR", None),
    (EngineError, grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", None),
    (UpstreamError, grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", None),
)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _entry(exc: BaseException) -> tuple[grpc.StatusCode, str, float | None]:
    return next(((c, r, after) for cls, c, r, after in STATUS_TABLE if isinstance(exc, cls)),
                (grpc.StatusCode.INTERNAL, "INTERNAL", None))


def reason_of(exc: BaseException) -> str:
    """The ErrorInfo reason a call failing with ``exc`` gets (``UPSTREAM_UNREACHABLE``...):
    the name logs give a failure, as the status and the metrics do."""
    return _entry(exc)[1]


def status_for(exc: Exception) -> grpc.Status:
    """Builds the rich status for one of our exceptions (or any other, as INTERNAL)."""
    if isinstance(exc, ReplayedStatus):  # a status made elsewhere (another replica's)
        error_reason_var.set(None)
        return _Status(exc.code, excerpt(exc.message, MAX_STATUS_MESSAGE),
                       exc.trailing + request_id_trailer() + load_trailer())
    code, reason, retry_after = _entry(exc)
    error_reason_var.set(reason)
    rid = request_id_var.get()
    metadata = {"request_id": rid}
    details = []
    if isinstance(exc, ValidationFailed):
        violations = [(f[:200], d[:300]) for f, d in exc.violations[:MAX_VIOLATIONS]]
        if len(exc.violations) > MAX_VIOLATIONS:
            violations.append(("...", f"and {len(exc.violations) - MAX_VIOLATIONS} more "
                                      "problems of the same kinds"))
        message = "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations[:5])
        if len(violations) > 5:
            message += f"; ... ({len(exc.violations)} problems in all, see BadRequest)"
    elif isinstance(exc, NotAuthenticated | NotAllowed | Overloaded | ShuttingDown
                    | ResponseTooLarge | Undecodable | MetadataTooLarge | ResumeError
                    | LimitsUnavailable):
        message = exc.message
        violations = []
    elif isinstance(exc, UpstreamError):
        message = exc.message
        violations = [(exc.field, exc.message)] if isinstance(exc, InvalidRequest) else []
        if exc.http_status is not None:
            metadata["upstream_http_status"] = str(exc.http_status)
    else:
        message = f"internal error in tokenwire (request id {rid}); see the server log"
        violations = []
    message = excerpt(message, MAX_STATUS_MESSAGE)
    details.append(_pack(error_details_pb2.ErrorInfo(
        reason=reason, domain=DOMAIN, metadata=metadata)))
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ])))
    if isinstance(exc, ModelNotFound):
        details.append(_pack(error_details_pb2.ResourceInfo(
            resource_type="model", resource_name=exc.model, description=message)))
    if isinstance(exc, BudgetExceeded):
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=f"caller:{exc.caller}",
                description=f"tokens_per_{exc.window} of caller '{exc.caller}'")])))
    if isinstance(exc, Overloaded):  # its own wait, whatever it is (None: not retryable)
        retry_after = exc.retry_after
    named = getattr(exc, "retry_after", None)  # the engine's own wait, or the breaker's
    if named is not None:
        retry_after = named
    pushback: tuple[tuple[str, str], ...] = ()
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(retry_after, 0.001) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        if isinstance(exc, Overloaded):
            # gRPC's own retry policy waits this long before it retries the call (a
            # client retrying RESOURCE_EXHAUSTED); never for UNAVAILABLE, which another
            # replica may serve at once.
            pushback = (("grpc-retry-pushback-ms", str(math.ceil(retry_after * 1000))),)
    elif isinstance(exc, Overloaded):
        pushback = (("grpc-retry-pushback-ms", "-1"),)  # gRPC: do not retry
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    rich = rpc_status.to_status(status)
    return _Status(rich.code, rich.details,
                   rich.trailing_metadata + pushback + request_id_trailer() + load_trailer())


@dataclass(frozen=True, slots=True)
class _Status(grpc.Status):  # type: ignore[misc]
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def request_id_trailer() -> tuple[tuple[str, str], ...]:
    """The call's ``x-request-id`` for its trailing metadata.

    It is sent in the initial metadata too, but a client can lose that: grpc.aio fills
    a call's initial metadata with nothing when the status is processed first (an early
    error), and drops what arrives after. Trailers come with the status, so an error
    never loses its request id.
    """
    rid = request_id_var.get()
    return (("x-request-id", rid),) if rid != "-" else ()


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def map_errors(handler: _Handler) -> _Handler:
    """Ends the call with the mapped status when the handler raises.

    Cancellation passes through untouched; so does an abort the handler did
    itself.
    """

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except (ValidationFailed, UpstreamError, ShuttingDown, ResponseTooLarge,
                ResumeError) as exc:
            status = status_for(exc)
            log.info("request failed rid=%s code=%s reason=%s", request_id_var.get(),
                     status.code.name, error_reason_var.get())
            await send_early_metadata(context)
            await context.abort(status.code, status.details, status.trailing_metadata)
        except Exception as exc:
            log.exception("unexpected error rid=%s", request_id_var.get())
            status = status_for(exc)
            await send_early_metadata(context)
            await context.abort(status.code, status.details, status.trailing_metadata)

    return wrapper  # type: ignore[return-value]
