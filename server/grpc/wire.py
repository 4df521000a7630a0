"""Registers the sol.v1 services on the gRPC server with a decoder that never throws.

grpc parses a request before any handler runs; the generated `add_*Servicer_to_server`
hands it the message's `FromString`, so corrupt bytes or invalid UTF-8 in a string field
end as grpc's own UNKNOWN ("Unexpected DecodeError"), an ERROR traceback in the log and
no count in the request metrics. Here the deserializer returns an `Undecodable` instead,
and the handler raises it as INVALID_ARGUMENT inside the service's error frame, the same
frame (status, message bound, metrics) as every other refusal.

The handlers are built from the service descriptors, so a method added to the proto is
registered without touching this file; reflection and health register themselves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

# grpc's own error for a failed batch of core operations (not exported by grpc.aio).
from grpc._cython.cygrpc import ExecuteBatchError

from server.errors import ServiceError, invalid

# The servicer's per-call frame: `async with frame(context, method) as labels:` maps a
# ServiceError raised inside to its status and counts the call (InferenceServicer.call).
Frame = Callable[[Any, str], contextlib.AbstractAsyncContextManager[dict[str, str]]]

MAX_REASON_CHARS = 200
# How long a failed write waits for grpc to deliver the client's cancel (grpc's core has
# both results at hand; the cancel's callback runs a few loop iterations later).
CANCEL_NOTICE_S = 1.0


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer returns for bytes that are not the method's request."""

    type_name: str
    reason: str

    def error(self) -> ServiceError:
        return invalid(f"the request is not a valid {self.type_name} ({self.reason}): send a serialized "
                       f"{self.type_name}, with valid UTF-8 in every string field")


def _reason(err: Exception) -> str:
    # protobuf says "Error parsing message with type 'T': Wire format was corrupt"; the
    # type is named in our message already, so keep the part after it.
    text = str(err).rpartition("': ")[2] or type(err).__name__
    return text[:MAX_REASON_CHARS]


def lenient(message_class: Any) -> Callable[[bytes], Any]:
    type_name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as err:  # noqa: BLE001 - any parse failure is the caller's bytes, not our bug
            return Undecodable(type_name, _reason(err))
    return deserialize


def _unary(behavior: Callable, frame: Frame, method: str) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            async with frame(context, method):
                raise request.error()
        return await behavior(request, context)
    return handle


async def _write(context: grpc.aio.ServicerContext, message: Any) -> None:
    """One streamed message. A write that was waiting on a client's full window when the
    client cancelled fails in grpc's core (ExecuteBatchError) a moment before grpc notices
    the cancel; raised from a response generator, grpc logs that as an ERROR traceback
    for every back-pressured stream a client drops. Here the failed write waits for the
    cancel, which grpc delivers into this task as CancelledError (logged at DEBUG), and
    only a write that fails with the client still there is raised."""
    try:
        await context.write(message)
    except ExecuteBatchError:
        await asyncio.sleep(CANCEL_NOTICE_S)
        raise


def _server_stream(behavior: Callable, frame: Frame, method: str) -> Callable:
    # A coroutine that writes, not an async generator that yields: only then does a write's
    # failure reach this code (see _write).
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            async with frame(context, method):
                raise request.error()
        # aclosing: when grpc drops this stream (client cancel), closing it closes the
        # servicer's generator at once, so its request is aborted and billed now, not
        # whenever the garbage collector finalizes it.
        async with contextlib.aclosing(behavior(request, context)) as responses:
            async for response in responses:
                await _write(context, response)
    return handle


def _handler(servicer: Any, method: MethodDescriptor, frame: Frame) -> grpc.RpcMethodHandler:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    behavior = getattr(servicer, method.name)
    options = {"request_deserializer": lenient(request_class),
               "response_serializer": response_class.SerializeToString}
    if method.client_streaming:
        # sol.v1 has no client-streaming method; one added would need its own wrapper.
        raise NotImplementedError(f"{method.full_name}: client streaming is not wired here")
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_server_stream(behavior, frame, method.name), **options)
    return grpc.unary_unary_rpc_method_handler(_unary(behavior, frame, method.name), **options)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any, frame: Frame) -> None:
    """What the generated `add_<Service>Servicer_to_server` does, with lenient decoding."""
    handlers = {m.name: _handler(servicer, m, frame) for m in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # Registered methods skip grpc's per-call handler lookup (what the generated code does too).
    server.add_registered_method_handlers(service.full_name, handlers)
