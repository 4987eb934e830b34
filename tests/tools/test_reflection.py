"""Server reflection v1 and v1alpha: a real grpcurl (which asks v1 first) and grpcio's own
v1alpha client, against the server's reflection."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.tools.test_grpcurl import _grpcurl
from tokenwire.service import Runtime
from tokenwire.service._reflection import V1_SERVICE_NAME, enable_reflection
from tokenwire.service._server import SERVICE_NAME

V1_METHOD = f"/{V1_SERVICE_NAME}/ServerReflectionInfo"
V1ALPHA_METHOD = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"


class _Seen(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Records the methods called, to tell which reflection version a client used."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        self.methods.append(details.method)
        return await continuation(details)


Serve = Callable[[Callable[[grpc.aio.Server], None]], Awaitable[tuple[str, _Seen]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts a bare server with the reflection ``setup`` adds; returns its target and what
    it saw."""
    servers: list[grpc.aio.Server] = []

    async def start(setup: Callable[[grpc.aio.Server], None]) -> tuple[str, _Seen]:
        seen = _Seen()
        server = grpc.aio.server(interceptors=[seen])
        setup(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", seen

    yield start
    for server in servers:
        await server.stop(0)


async def test_grpcurl_lists_and_describes_through_v1(tool_bin: Path, serve: Serve) -> None:
    target, seen = await serve(lambda server: enable_reflection([SERVICE_NAME], server))
    code, out, err = await _grpcurl(tool_bin, target, "list")
    assert code == 0, err
    assert set(out.split()) == {SERVICE_NAME, V1_SERVICE_NAME, reflection.SERVICE_NAME}
    code, out, err = await _grpcurl(tool_bin, target, "describe", "tokenwire.v1.Token")
    assert code == 0, err
    assert "message Token {" in out
    # v1 describes itself too: its descriptor is in the pool.
    code, out, err = await _grpcurl(tool_bin, target, "describe", V1_SERVICE_NAME)
    assert code == 0, err
    assert ("rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest ) "
            "returns ( stream .grpc.reflection.v1.ServerReflectionResponse )") in out
    assert set(seen.methods) == {V1_METHOD}, seen.methods


async def test_grpcurl_falls_back_without_v1(tool_bin: Path, serve: Serve) -> None:
    """The check above can tell: grpcio-reflection alone (v1alpha) makes grpcurl ask v1,
    get UNIMPLEMENTED, and go on with v1alpha."""
    target, seen = await serve(
        lambda server: reflection.enable_server_reflection([SERVICE_NAME], server))
    code, out, err = await _grpcurl(tool_bin, target, "list")
    assert code == 0, err
    assert seen.methods[0] == V1_METHOD and V1ALPHA_METHOD in seen.methods, seen.methods


async def test_the_server_answers_both_versions(tool_bin: Path, runtime: Runtime) -> None:
    code, out, err = await _grpcurl(tool_bin, runtime.target, "list")
    assert code == 0, err
    assert {V1_SERVICE_NAME, reflection.SERVICE_NAME, SERVICE_NAME} <= set(out.split())

    def v1alpha_client() -> tuple[list[str], str]:
        with grpc.insecure_channel(runtime.target) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = database.get_services()
            found = database.FindFileContainingSymbol("tokenwire.v1.GenerationService")
            return list(services), found.name

    services, filename = await asyncio.to_thread(v1alpha_client)
    assert {V1_SERVICE_NAME, reflection.SERVICE_NAME, SERVICE_NAME} <= set(services)
    assert filename == "tokenwire/v1/generation.proto"

    # And v1 itself answers on the server (the same messages on the wire: see above for a v1
    # client of its own, grpcurl's).
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        info = channel.stream_stream(
            V1_METHOD, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        answers = [a async for a in info(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=10)]
    assert {s.name for s in answers[0].list_services_response.service} == set(services)


def test_grpcio_reflection_still_lacks_v1() -> None:
    """tokenwire.service._reflection builds v1 because grpcio-reflection has none; once it
    has one, its generated v1 module would clash with that descriptor in the default pool:
    serve v1 with the library's own then, and drop tokenwire's."""
    assert importlib.util.find_spec("grpc_reflection.v1") is None
