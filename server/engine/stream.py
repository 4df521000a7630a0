"""The event stream of one request: filled by the engine thread, read by a blocking
iterator or by `async for` on any asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable

from server.engine.api import Event, RequestFinished


class RequestStream:
    def __init__(self, request_id: str, abort: Callable[[str, int | None], None]) -> None:
        self.request_id = request_id
        self._abort = abort
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._closed = False           # RequestFinished was delivered to the reader

    # --- engine side ----------------------------------------------------------------------
    def push(self, events: list[Event]) -> None:
        with self._cond:
            self._events.extend(events)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            # The reader's loop may already be closed (its task was cancelled): nothing to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, fut)

    # --- reader side ----------------------------------------------------------------------
    def abort(self) -> None:
        """Stop generating; the stream still ends with ChoiceFinished(abort) events and a
        RequestFinished carrying the usage so far."""
        self._abort(self.request_id, None)

    def abort_choice(self, index: int) -> None:
        """Stop one choice (its stop string was found); the others go on."""
        self._abort(self.request_id, index)

    def _pop(self) -> Event | None:
        if self._closed:
            raise StopIteration
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, RequestFinished):
            self._closed = True
        return event

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> Event:
        with self._cond:
            while True:
                event = self._pop()
                if event is not None:
                    return event
                self._cond.wait()

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds; raises StopIteration at the end."""
        with self._cond:
            event = self._pop()
            if event is None and self._cond.wait(timeout):
                event = self._pop()
            return event

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                try:
                    event = self._pop()
                except StopIteration:
                    raise StopAsyncIteration from None
                if event is not None:
                    return event
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            await fut


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
