"""The frame around every call, the same for both protocols: which outcome a call had (a
ServiceError's status, CANCELLED, or INTERNAL for anything unexpected, logged with a
reference the user is told), and one count of it in `sol_requests_total`. Each adapter
only turns the ServiceError that leaves the frame into its own wire form (a gRPC status,
an HTTP error body or SSE event)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from server.errors import ServiceError
from server.metrics import ServiceMetrics

log = logging.getLogger("sol.server")


@dataclass
class CallFrame:
    labels: dict[str, str] = field(default_factory=lambda: {"model": ""})
    deferred: bool = False          # a stream: counted when it ends, not when the frame closes
    code: str = "OK"


def internal_error(method: str, mid_stream: bool = False) -> ServiceError:
    """The error a user sees for a bug: a reference to the traceback logged here, never
    the traceback itself. Call it from an `except` block."""
    ref = uuid.uuid4().hex[:12]
    log.exception("internal error %s in %s", ref, method)
    if mid_stream:
        return ServiceError(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}) mid-stream; retry the request")
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the request was not completed, "
                                                  "retry it")


def count_call(metrics: ServiceMetrics, protocol: str, model: str, method: str, code: str) -> None:
    metrics.requests.labels(protocol, model, method, code).inc()


@contextlib.asynccontextmanager
async def call_frame(metrics: ServiceMetrics, protocol: str, method: str,
                     cancelled: tuple[type[BaseException], ...] = (asyncio.CancelledError,),
                     passthrough: tuple[type[BaseException], ...] = ()) -> AsyncIterator[CallFrame]:
    """Runs one call's body: a ServiceError leaves as it is, an unexpected exception
    leaves as INTERNAL (see internal_error), `cancelled` ones (the client went away) and
    `passthrough` ones (the protocol's own control flow) unchanged. The outcome is counted
    once, when the frame closes, unless the body deferred that to the end of its stream."""
    frame = CallFrame()
    try:
        yield frame
    except ServiceError as err:
        frame.code = err.code.name
        raise
    except cancelled:
        frame.code = "CANCELLED"
        raise
    except passthrough:
        raise
    except Exception:
        frame.code = "INTERNAL"
        raise internal_error(method) from None
    finally:
        if frame.code != "OK" or not frame.deferred:
            count_call(metrics, protocol, frame.labels["model"], method, frame.code)
