"""Server reflection in both of its versions: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection (1.85, the newest) serves only v1alpha, while grpcurl (the pinned 1.9.4,
as tests/tools/test_reflection.py sees) and Postman ask for v1 first and fall back to
v1alpha only when v1 is UNIMPLEMENTED. The two versions are one protocol: v1's
reflection.proto is v1alpha's with the package renamed (same messages, fields, numbers and
service; only the file options differ), so their bytes on the wire are the same.

So one servicer, grpcio-reflection's own, answers both. v1 is registered as a second
service whose handler decodes requests and encodes responses with the v1alpha classes.
For v1 to describe itself (``grpcurl describe grpc.reflection.v1.ServerReflection``), its
file descriptor is put in the default pool: v1alpha's descriptor with the package renamed,
built once at import, so no copy of the .proto is kept here. Per call this costs nothing
beyond what v1alpha costs. When grpcio-reflection ships v1 of its own, serve that instead
(a test watches for it: its generated module and this descriptor could not share the pool).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["V1ALPHA_SERVICE_NAME", "V1_SERVICE_NAME", "enable_reflection"]

_V1ALPHA = reflection_pb2.DESCRIPTOR.package  # grpc.reflection.v1alpha
_V1 = _V1ALPHA.rsplit(".", 1)[0] + ".v1"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _renamed(type_name: str) -> str:
    prefix = f".{_V1ALPHA}."
    return f".{_V1}.{type_name[len(prefix):]}" if type_name.startswith(prefix) else type_name


def _rename_fields(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            if field.HasField("type_name"):  # message and enum fields only
                field.type_name = _renamed(field.type_name)
        _rename_fields(message.nested_type)


def _v1_descriptor() -> FileDescriptor:
    """grpc/reflection/v1/reflection.proto in the default pool (added unless present)."""
    pool = descriptor_pool.Default()
    try:
        found: FileDescriptor = pool.FindFileByName(_V1_FILE)
        return found
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = _V1
    # v1's own file options: v1alpha's file is deprecated, v1's is not.
    proto.options.ClearField("deprecated")
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_package = "io.grpc.reflection.v1"
    _rename_fields(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    added: FileDescriptor = pool.AddSerializedFile(proto.SerializeToString())
    return added


_V1_SERVICE = _v1_descriptor().services_by_name["ServerReflection"]
V1_SERVICE_NAME: str = _V1_SERVICE.full_name
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection v1 and v1alpha on ``server``, listing ``service_names`` and both
    reflection services."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    (method,) = _V1_SERVICE.methods
    handlers = {method.name: grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers),))
