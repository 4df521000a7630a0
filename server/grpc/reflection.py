"""gRPC server reflection in both of its versions: `grpc.reflection.v1` (what current
grpcurl, Postman and grpcui ask first) and `grpc.reflection.v1alpha` (older clients).

grpcio-reflection (1.85) implements v1alpha only. v1 is the same protocol under a new
package: the same messages with the same field numbers and the same one streaming
method, so the bytes a v1 client sends parse as v1alpha messages and the answers are
identical on the wire. The v1 service is therefore registered with the v1alpha
servicer's handler, and v1's file descriptor (v1alpha's with the package renamed) is
added to the default descriptor pool so that reflection can describe itself under both
names (`grpcurl describe grpc.reflection.v1.ServerReflection`).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICE = "ServerReflection"
METHOD = "ServerReflectionInfo"
SERVICE_NAMES = (f"{V1}.{SERVICE}", f"{V1ALPHA}.{SERVICE}")


def _renamed(type_name: str) -> str:
    return type_name.replace(f".{V1ALPHA}.", f".{V1}.", 1)


def v1_file() -> FileDescriptor:
    """The v1 reflection file in the default pool, added on first use."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, V1
    # v1alpha is marked deprecated and names its own Java/Go packages; v1 is neither.
    proto.ClearField("options")
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:
                f.type_name = _renamed(f.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = _renamed(method.input_type), _renamed(method.output_type)
    pool.Add(proto)
    return pool.FindFileByName(V1_FILE)


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for `service_names` (plus both reflection services) on `server`."""
    v1_file()
    names = tuple(dict.fromkeys((*service_names, *SERVICE_NAMES)))
    servicer = ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(f"{V1}.{SERVICE}", {METHOD: grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)})
    server.add_generic_rpc_handlers((v1,))
