"""Exceptions raised by the client: the one drawing of their tree.

Every failed call surfaces as a ``TokenwireError`` subclass chosen by its gRPC status code
(right: the codes it maps from), with the server's rich details (google.rpc.Status from the
``grpc-status-details-bin`` trailer) already unpacked:

    TokenwireError               a call ended with a non-OK gRPC status
    ├── InvalidArgument          INVALID_ARGUMENT: the request is wrong; see .field_violations
    ├── NotFound                 NOT_FOUND: e.g. the model is not installed; see .resource_info
    ├── Unavailable              UNAVAILABLE: server or engine unreachable (retryable)
    ├── DeadlineExceeded         DEADLINE_EXCEEDED: a deadline passed (the call's or the server's)
    ├── Cancelled                CANCELLED: the call was cancelled (by either side)
    ├── ResourceExhausted        RESOURCE_EXHAUSTED: a limit or budget is reached (retryable)
    ├── Unauthenticated          UNAUTHENTICATED: no or wrong credentials
    ├── PermissionDenied         PERMISSION_DENIED: the credentials do not allow this call
    ├── Internal                 INTERNAL, UNKNOWN, DATA_LOSS: a fault of the server or engine
    └── OtherError               any other code (FAILED_PRECONDITION, OUT_OF_RANGE...)

    CallbackError                an ``on_token`` callback raised (not a gRPC status)

Errors raised while streaming carry ``partial_text``: the answer text received before the
failure, so nothing already delivered is lost. All carry ``request_id`` when the server sent
one (quote it when reporting a problem) and ``reason``, tokenwire's word for the cause
(``MODEL_NOT_FOUND``, ``UPSTREAM_UNREACHABLE``...: the README's Errors table).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message as ProtoMessage
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "CallbackError",
    "Cancelled",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OtherError",
    "PermissionDenied",
    "ResourceExhausted",
    "TokenwireError",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]

_DETAILS_KEY = "grpc-status-details-bin"
_REQUEST_ID_KEY = "x-request-id"


class TokenwireError(Exception):
    """A call ended with a non-OK gRPC status.

    ``details`` holds the unpacked google.rpc detail messages (``BadRequest``,
    ``ErrorInfo``, ``ResourceInfo``, ``RetryInfo``...); a detail of a type this process
    does not know stays a ``google.protobuf.Any``.
    """

    #: Whether the same request may succeed if sent again later.
    retryable: bool = False

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        details: Iterable[ProtoMessage] = (),
        request_id: str | None = None,
        partial_text: str = "",
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.details: list[ProtoMessage] = list(details)
        self.request_id = request_id
        #: Answer text received before a streaming call failed ("" for unary calls).
        self.partial_text = partial_text

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def _detail(self, kind: type[Any]) -> Any:
        return next((d for d in self.details if isinstance(d, kind)), None)

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """``(field, description)`` pairs from a ``BadRequest`` detail."""
        return [
            (violation.field, violation.description)
            for detail in self.details
            if isinstance(detail, error_details_pb2.BadRequest)
            for violation in detail.field_violations
        ]

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asks to wait before retrying (``RetryInfo``), if it said."""
        info = self._detail(error_details_pb2.RetryInfo)
        if info is None or not info.HasField("retry_delay"):
            return None
        return float(info.retry_delay.ToTimedelta().total_seconds())

    @property
    def reason(self) -> str:
        """tokenwire's word for the cause, from the ``ErrorInfo`` detail
        (``"MODEL_NOT_FOUND"``, ``"UPSTREAM_UNREACHABLE"``...; the README's Errors table);
        "" when the server sent none."""
        info = self.error_info
        return info.reason if info is not None else ""

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        """The ``ErrorInfo`` detail (``reason``, ``domain``, ``metadata``), if any."""
        return self._detail(error_details_pb2.ErrorInfo)

    @property
    def resource_info(self) -> error_details_pb2.ResourceInfo | None:
        """The ``ResourceInfo`` detail (e.g. the missing model), if any."""
        return self._detail(error_details_pb2.ResourceInfo)


class InvalidArgument(TokenwireError):
    """The server refused the request as written (INVALID_ARGUMENT): fix it before sending
    again. ``field_violations`` lists each bad field with what to do."""


class NotFound(TokenwireError):
    """Something the request names does not exist (NOT_FOUND): a model that is not
    installed (``resource_info`` names it), or a resumable stream id that is unknown."""


class Unavailable(TokenwireError):
    """The server or its engine could not be reached or failed (UNAVAILABLE). Retryable:
    ``retry_after`` says when, if the server said."""

    retryable = True


class DeadlineExceeded(TokenwireError):
    """A deadline passed (DEADLINE_EXCEEDED): the call's ``timeout``, or one of the
    server's own waits (first token, idle gap; ``error_info.reason`` says which)."""


class Cancelled(TokenwireError):
    """The call was cancelled (CANCELLED): by this client (``stream.cancel()``), or by the
    server (a resumable stream stopped by Cancel)."""


class ResourceExhausted(TokenwireError):
    """A limit was reached (RESOURCE_EXHAUSTED): concurrency, request rate, token budget,
    message size. Retryable; ``retry_after`` says when, if the server said."""

    retryable = True


class Unauthenticated(TokenwireError):
    """The call carried no credentials or wrong ones (UNAUTHENTICATED): set the
    ``authorization`` metadata the server expects."""


class PermissionDenied(TokenwireError):
    """The credentials are valid but do not allow this call (PERMISSION_DENIED)."""


class Internal(TokenwireError):
    """A fault in the server or its engine (INTERNAL, UNKNOWN, DATA_LOSS): not the
    request's doing; ``request_id`` helps whoever runs the server find it."""


class OtherError(TokenwireError):
    """Any other status (FAILED_PRECONDITION, OUT_OF_RANGE, UNIMPLEMENTED...): ``code``
    says which."""


class CallbackError(Exception):
    """An ``on_token`` callback raised; the call was cancelled. ``__cause__`` is the error."""

    def __init__(self, message: str, *, partial_text: str, request_id: str | None) -> None:
        super().__init__(message)
        self.partial_text = partial_text
        self.request_id = request_id


_BY_CODE: dict[grpc.StatusCode, type[TokenwireError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}


def error_for(
    code: grpc.StatusCode,
    message: str,
    *,
    details: Iterable[ProtoMessage] = (),
    request_id: str | None = None,
    partial_text: str = "",
) -> TokenwireError:
    """Build the exception class that matches ``code``."""
    cls = _BY_CODE.get(code, OtherError)
    return cls(code, message, details=details, request_id=request_id, partial_text=partial_text)


def from_rpc_error(err: grpc.RpcError) -> TokenwireError:
    """Translate a ``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError`` into our tree.

    Both kinds expose ``code()``, ``details()`` and the metadata synchronously once the
    call has failed, so one parser serves both twins. Unlike
    ``grpc_status.rpc_status.from_call``, a rich status whose code or message disagrees
    with the call's is still read rather than raising ``ValueError``.
    """
    code = _call_attr(err, "code")
    text = _call_attr(err, "details") or ""
    if code is None:  # an RpcError that is not a failed call
        code, text = grpc.StatusCode.UNKNOWN, text or str(err)
    trailing = _pairs(_call_attr(err, "trailing_metadata"))
    initial = _pairs(_call_attr(err, "initial_metadata"))
    details: list[ProtoMessage] = []
    raw = trailing.get(_DETAILS_KEY)
    if isinstance(raw, bytes):
        status = status_pb2.Status.FromString(raw)
        details = [_unpack(item) for item in status.details]
        text = text or status.message
    return error_for(
        code,
        text or code.name.replace("_", " ").lower(),
        details=details,
        request_id=request_id_from(initial) or request_id_from(trailing)
        or _error_info_request_id(details),
    )


def _error_info_request_id(details: list[ProtoMessage]) -> str | None:
    """tokenwire also puts the request id in ErrorInfo, for clients that see no metadata."""
    for item in details:
        if isinstance(item, error_details_pb2.ErrorInfo):
            return item.metadata.get("request_id") or None
    return None


def request_id_from(metadata: Any) -> str | None:
    """The ``x-request-id`` value in a metadata mapping or sequence of pairs, if present."""
    value = (metadata if isinstance(metadata, dict) else _pairs(metadata)).get(_REQUEST_ID_KEY)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _call_attr(err: grpc.RpcError, name: str) -> Any:
    getter = getattr(err, name, None)
    return getter() if callable(getter) else None


def _pairs(metadata: Any) -> dict[str, str | bytes]:
    if not metadata:
        return {}
    return {str(key): value for key, value in metadata}


def _unpack(item: any_pb2.Any) -> ProtoMessage:
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(item.TypeName())
    except KeyError:
        return item
    unpacked: ProtoMessage = message_factory.GetMessageClass(descriptor)()
    item.Unpack(unpacked)
    return unpacked
