"""Read deadlines for HTTP/1.1 connections, which uvicorn does not have.

uvicorn closes a keep-alive connection that stays idle after a response
(`timeout_keep_alive`) and caps the header block's size (`h11_max_incomplete_event_size`),
but a connection that opens and sends nothing, or sends half a header block, or
headers and then half a body, a byte now and then (slowloris), is held for ever: one
file descriptor and one protocol object each, until the process runs out. This
protocol adds two deadlines, not inactivity timers (a byte every few seconds must not
keep a connection alive):

- headers: from the connection's opening, or from the first byte of a later request
  on a keep-alive connection, to the end of the header block;
- body: from the end of the headers to the end of the body.

Past either, the client gets `408 Request Timeout` (when no response has started) and
the connection is closed; an app waiting on the body sees the disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("sol.http")


def timeout_response(what: str, seconds: float) -> bytes:
    body = f"request {what} not received within {seconds:g} s; send the whole request promptly\n".encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body read deadlines. Made per connection
    by uvicorn; `configure` sets the deadlines for every instance (a subclass per
    server, so two servers in one process keep their own)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    @classmethod
    def configure(cls, header_timeout_s: float, body_timeout_s: float) -> type[DeadlineH11Protocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_state: object | None = None      # the h11 state the timer guards

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._deadline is None:
            self._arm(h11.IDLE, self.header_timeout_s)      # the first byte of a keep-alive's next request
        super().data_received(data)
        self._guard()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._guard()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- the one timer, following h11's view of the client ------------------------------------
    def _guard(self) -> None:
        """Keep the timer on the phase the client is in: reading headers (IDLE, armed
        at the opening and on a later request's first byte), reading a body (SEND_BODY),
        or none (the request is read; the response is the app's)."""
        state = self.conn.their_state
        if state is self._deadline_state:
            return
        self._disarm()
        if state is h11.SEND_BODY:
            self._arm(state, self.body_timeout_s)
        elif state is h11.IDLE and self.cycle is None:
            self._arm(state, self.header_timeout_s)         # a new connection: nothing read yet

    def _arm(self, state: Any, seconds: float) -> None:
        self._disarm()
        self._deadline_state = state
        self._deadline = self.loop.call_later(seconds, self._expired, state, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._deadline_state = None

    def _expired(self, state: Any, seconds: float) -> None:
        self._deadline = None
        self._deadline_state = None
        if self.transport.is_closing() or self.conn.their_state is not state:
            return
        what = "body" if state is h11.SEND_BODY else "headers"
        started = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        if not started:
            self.transport.write(timeout_response(what, seconds))
        log.debug("closing an HTTP connection whose request %s took over %g s", what, seconds)
        self.transport.close()
