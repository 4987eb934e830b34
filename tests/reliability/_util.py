"""Small helpers shared by the reliability tests."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
from google.rpc import error_details_pb2

from tests.helpers import detail
from tests.reliability.pki import KeyPair, Pki
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

__all__ = ["bearer", "generate_all", "outcome", "retry_delay", "tls_channel"]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def tls_channel(target: str, pki: Pki, client: KeyPair | None = None,
                root: bytes | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root or pki.ca_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.aio.secure_channel(target, credentials)


async def generate_all(stub: GenerationServiceStub, request: pb.GenerateRequest | None = None,
                       **kwargs: object) -> list[pb.Token]:
    request = request or pb.GenerateRequest(model="tiny", prompt="hello")
    kwargs.setdefault("timeout", 10)
    return [t async for t in stub.Generate(request, **kwargs)]


async def outcome(call: Awaitable[object]) -> grpc.StatusCode:
    """The status code a call ends with (OK when it raises nothing)."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def retry_delay(err: grpc.aio.AioRpcError) -> float:
    info = detail(err, error_details_pb2.RetryInfo)
    return float(info.retry_delay.ToNanoseconds()) / 1e9
