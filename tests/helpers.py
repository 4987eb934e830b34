"""Small helpers for end-to-end tests."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from tokenwire.v1 import generation_pb2 as pb


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status sent in the trailers (fails if there is none)."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    raise AssertionError(f"no rich status in trailers of {err!r}")


def detail(err: grpc.aio.AioRpcError, kind: type[Any]) -> Any:
    """The first detail of the given google.rpc type, unpacked."""
    for packed in rich_status(err).details:
        message = kind()
        if packed.Unpack(message):
            return message
    raise AssertionError(f"no {kind.__name__} in details of {err!r}")


def violations(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    bad = detail(err, error_details_pb2.BadRequest)
    return [(v.field, v.description) for v in bad.field_violations]


def reason(err: grpc.aio.AioRpcError) -> str:
    return str(detail(err, error_details_pb2.ErrorInfo).reason)


def joined(tokens: list[pb.Token]) -> str:
    return "".join(t.text for t in tokens)


def last_body(fake: Any, path: str) -> Any:
    """The JSON body of the latest request to ``path`` (health probes run in between)."""
    return [r for r in fake.requests if r.path == path][-1].body
