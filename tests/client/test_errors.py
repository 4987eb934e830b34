from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tokenwire import client as tw
from tokenwire.client import from_rpc_error

from .conftest import error_info, rich_status


class FakeCallError(grpc.RpcError):
    """Shaped like the errors grpc raises: a failed call with its status and metadata."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing: Any = (),
        initial: Any = (),
    ) -> None:
        self._code, self._details, self._trailing, self._initial = code, details, trailing, initial

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing

    def initial_metadata(self) -> Any:
        return self._initial


def failed(status: grpc.Status, **kwargs: Any) -> FakeCallError:
    return FakeCallError(status.code, status.details, status.trailing_metadata, **kwargs)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, tw.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, tw.NotFound),
        (grpc.StatusCode.UNAVAILABLE, tw.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, tw.DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, tw.Cancelled),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, tw.ResourceExhausted),
        (grpc.StatusCode.UNAUTHENTICATED, tw.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, tw.PermissionDenied),
        (grpc.StatusCode.INTERNAL, tw.Internal),
        (grpc.StatusCode.UNKNOWN, tw.Internal),
        (grpc.StatusCode.DATA_LOSS, tw.Internal),
        (grpc.StatusCode.FAILED_PRECONDITION, tw.OtherError),
        (grpc.StatusCode.UNIMPLEMENTED, tw.OtherError),
    ],
)
def test_each_status_code_maps_to_its_class(code: grpc.StatusCode, cls: type) -> None:
    exc = from_rpc_error(FakeCallError(code, "boom"))
    assert type(exc) is cls
    assert isinstance(exc, tw.TokenwireError)
    assert exc.code is code
    assert exc.message == "boom"
    assert str(exc) == f"{code.name}: boom"
    assert exc.details == []


def test_retryable_classes() -> None:
    assert tw.Unavailable.retryable and tw.ResourceExhausted.retryable
    assert not tw.InvalidArgument.retryable and not tw.NotFound.retryable


def test_bad_request_becomes_field_violations() -> None:
    violations = [
        error_details_pb2.BadRequest.FieldViolation(field="prompt", description="empty"),
        error_details_pb2.BadRequest.FieldViolation(field="options.top_p", description="> 1"),
    ]
    status = rich_status(
        code_pb2.INVALID_ARGUMENT,
        "invalid request",
        error_details_pb2.BadRequest(field_violations=violations),
    )
    exc = from_rpc_error(failed(status))
    assert isinstance(exc, tw.InvalidArgument)
    assert exc.field_violations == [("prompt", "empty"), ("options.top_p", "> 1")]
    assert isinstance(exc.details[0], error_details_pb2.BadRequest)
    assert exc.retry_after is None
    assert exc.error_info is None


def test_error_info_resource_info_and_retry_info_are_unpacked() -> None:
    status = rich_status(
        code_pb2.UNAVAILABLE,
        "engine busy",
        error_info("ENGINE_BUSY", queue="full"),
        error_details_pb2.ResourceInfo(resource_type="model", resource_name="tiny"),
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=5 * 10**8)),
    )
    exc = from_rpc_error(failed(status))
    assert exc.retry_after == 2.5
    assert exc.error_info is not None
    assert (exc.error_info.reason, exc.error_info.domain) == ("ENGINE_BUSY", "tokenwire.dev")
    assert dict(exc.error_info.metadata) == {"queue": "full"}
    assert exc.resource_info is not None
    assert exc.resource_info.resource_name == "tiny"
    assert exc.field_violations == []


def test_unknown_detail_type_stays_packed() -> None:
    unknown = any_pb2.Any(type_url="type.googleapis.com/acme.v1.Mystery", value=b"\x08\x01")
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="odd", details=[unknown])
    trailing = (("grpc-status-details-bin", status.SerializeToString()),)
    exc = from_rpc_error(FakeCallError(grpc.StatusCode.INTERNAL, "odd", trailing))
    assert exc.details == [unknown]


def test_rich_status_disagreeing_with_the_call_is_still_read() -> None:
    status = rich_status(code_pb2.NOT_FOUND, "other words", error_info("MODEL_NOT_FOUND"))
    exc = from_rpc_error(FakeCallError(grpc.StatusCode.NOT_FOUND, "gone", status.trailing_metadata))
    assert exc.message == "gone"
    assert exc.error_info is not None


@pytest.mark.parametrize("where", ["initial", "trailing"])
def test_request_id_is_read_from_either_metadata(where: str) -> None:
    metadata = (("x-request-id", "abc-123"),)
    kwargs = {"initial": metadata} if where == "initial" else {"trailing": metadata}
    exc = from_rpc_error(FakeCallError(grpc.StatusCode.INTERNAL, "x", **kwargs))
    assert exc.request_id == "abc-123"


def test_request_id_falls_back_to_error_info() -> None:
    status = rich_status(code_pb2.INTERNAL, "x", error_info("UPSTREAM_ERROR", request_id="r-5"))
    exc = from_rpc_error(FakeCallError(grpc.StatusCode.INTERNAL, "x", status.trailing_metadata))
    assert exc.request_id == "r-5"


def test_error_without_call_information() -> None:
    exc = from_rpc_error(grpc.RpcError("no call attached"))
    assert isinstance(exc, tw.Internal)
    assert exc.code is grpc.StatusCode.UNKNOWN
    assert exc.request_id is None
