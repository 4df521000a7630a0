"""RequestStream's asyncio readers: woken at once by a plain push, and only by the flush
when the engine gathers a step's wake-ups (one call per event loop)."""

from __future__ import annotations

import asyncio
import threading

from server.engine.api import Delta
from server.engine.stream import RequestStream, Wakeups


def _stream(rid: str) -> RequestStream:
    return RequestStream(rid, abort=lambda *_: None)


def _readers_on_a_loop(streams: list[RequestStream]):
    """Start an event loop on a thread whose tasks read each stream's first event; returns
    (loop, {request id: threading.Event set when that reader got its event}, thread)."""
    loop = asyncio.new_event_loop()
    got = {s.request_id: threading.Event() for s in streams}
    waiting = threading.Event()

    async def read(s: RequestStream) -> None:
        await s.__anext__()
        got[s.request_id].set()

    async def main() -> None:
        tasks = [asyncio.create_task(read(s)) for s in streams]
        while not all(s._waiters for s in streams):
            await asyncio.sleep(0.001)
        waiting.set()
        await asyncio.gather(*tasks)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()))
    thread.start()
    assert waiting.wait(10), "the readers never started waiting"
    return loop, got, thread


def test_plain_push_wakes_the_reader_at_once():
    s = _stream("a")
    loop, got, thread = _readers_on_a_loop([s])
    s.push([Delta("a", 0, [5], [])])
    assert got["a"].wait(10)
    thread.join(10)
    loop.close()


def test_gathered_wakeups_wait_for_the_flush_then_wake_every_reader():
    streams = [_stream(f"r{i}") for i in range(8)]
    loop, got, thread = _readers_on_a_loop(streams)
    calls = []
    real = loop.call_soon_threadsafe

    def counting(*args):
        calls.append(args)
        return real(*args)

    loop.call_soon_threadsafe = counting   # type: ignore[method-assign]
    wakeups = Wakeups()
    for s in streams:
        s.push([Delta(s.request_id, 0, [1], [])], wakeups)
    # Nothing woken yet: the events wait in the streams until the step ends.
    assert not any(e.wait(0.2) for e in got.values())
    wakeups.flush()
    assert all(e.wait(10) for e in got.values())
    assert len(calls) == 1, "one wake-up call per event loop, not one per stream"
    thread.join(10)
    loop.close()
    wakeups.flush()   # nothing left: a second flush is a no-op


def test_flush_after_the_loop_closed_is_harmless():
    # The reader's loop went away before the step ended (its client disconnected).
    loop = asyncio.new_event_loop()
    fut = loop.create_future()
    loop.close()
    wakeups = Wakeups()
    wakeups.add([(loop, fut)])
    wakeups.flush()
    assert not fut.done()
