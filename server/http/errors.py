"""Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with
the HTTP status that OpenAI's SDKs map to their exception classes (400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 429 RateLimitError...).

The message is the ServiceError's, word for word, as gRPC callers get it; `code` is the
gRPC status name in lower case, the same status the metrics count for both protocols.
A refusal that waiting cures (429, 503) carries Retry-After (seconds) and
retry-after-ms, which the OpenAI SDKs honour when they retry; one that waiting does not
cure (a spent budget, a reused Idempotency-Key) says `x-should-retry: false`, which
stops those SDKs from retrying 409 and 429 in vain.
"""

from __future__ import annotations

import math

import grpc
from fastapi.responses import JSONResponse

from server.errors import ServiceError

# gRPC status -> (HTTP status, OpenAI error type)
STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
SERVER_ERROR = (500, "server_error")
# HTTP status of errors raised outside the service (routing, body parsing) -> gRPC status
# name, so they are counted like the service's own refusals.
HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                503: "UNAVAILABLE"}


def body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                   retry_after_s: float | None = None) -> JSONResponse:
    headers = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        headers["retry-after-ms"] = str(int(retry_after_s * 1000))
        headers["x-should-retry"] = "true"
    elif status in (409, 429):
        headers["x-should-retry"] = "false"
    return JSONResponse(body(message, type_, code, param), status_code=status, headers=headers)


def service_error_body(err: ServiceError) -> tuple[int, dict]:
    status, type_ = STATUS.get(err.code, SERVER_ERROR)
    return status, body(err.message, type_, err.code.name.lower(), err.param)


def service_error_response(err: ServiceError) -> JSONResponse:
    status, type_ = STATUS.get(err.code, SERVER_ERROR)
    return error_response(status, err.message, type_, err.code.name.lower(), err.param,
                          retry_after_s=err.retry_after_s)
