"""The one error type the service raises toward a caller: a gRPC status code and a
message that says what to change, plus retry information when waiting helps.

A status message travels in an HTTP/2 trailer (percent-encoded, so up to three times its
UTF-8 size), and a trailer block over the peer's metadata limit (8 KiB by default) turns
the intended status into RESOURCE_EXHAUSTED. Values quoted in messages are cut where they
are quoted (gpt.quoting.quote); `bounded` is the last guard, applied where a
ServiceError becomes a status."""

from __future__ import annotations

import grpc

from server.accounting.auth import AuthError

RETRY_AFTER_MD = "retry-after-ms"
# 1 KiB of UTF-8 is at most 3 KiB percent-encoded: well inside an 8 KiB trailer block.
MAX_MESSAGE_BYTES = 1024
CUT_MARK = " … (message cut)"


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut to at most `limit` bytes of UTF-8, marked when cut. Characters UTF-8
    cannot carry (lone surrogates) become '?' instead of failing the status."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return data.decode("utf-8")
    keep = data[:limit - len(CUT_MARK.encode("utf-8"))]
    return keep.decode("utf-8", "ignore") + CUT_MARK


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return ((RETRY_AFTER_MD, str(int(self.retry_after_s * 1000))),)


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def exhausted(message: str, retry_after_s: float | None = None) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s or None)


def unavailable(message: str, retry_after_s: float | None = 1.0) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, retry_after_s)


def failed_precondition(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message)


AUTH_CODES = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
              "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
              "unavailable": grpc.StatusCode.UNAVAILABLE}


def auth_error(err: AuthError) -> ServiceError:
    """A refused key or admin check as the status both adapters answer with."""
    return ServiceError(AUTH_CODES[err.code], str(err), 1.0 if err.code == "unavailable" else None)
