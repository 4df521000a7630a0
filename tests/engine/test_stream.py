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


def _drain(s: RequestStream) -> list:
    """Every event the reader may take now, without waiting."""
    out = []
    try:
        while (event := s.get(0)) is not None:
            out.append(event)
    except StopIteration:       # the end was read
        pass
    return out


def _tokens(events) -> list[int]:
    return [t for e in events if isinstance(e, Delta) for t in e.token_ids]


def test_an_interval_shows_the_first_token_then_every_nth_and_the_end_at_once():
    from server.engine.api import ChoiceFinished, RequestFinished, RequestTimings, Usage

    s = RequestStream("a", abort=lambda *_: None, interval=3)
    s.push([Delta("a", 0, [1], [])])
    assert _tokens(_drain(s)) == [1]                    # the first token at once
    s.push([Delta("a", 0, [2], [])])
    s.push([Delta("a", 0, [3], [])])
    assert _drain(s) == []                              # held: two of three
    s.push([Delta("a", 0, [4], [])])
    assert _tokens(_drain(s)) == [2, 3, 4]              # the third releases the three
    s.push([Delta("a", 0, [5], [])])
    assert _drain(s) == []
    s.push([ChoiceFinished("a", 0, "stop"), RequestFinished("a", Usage(1, 5), RequestTimings(0.0))])
    events = _drain(s)                                  # a finish shows everything at once
    assert _tokens(events) == [5] and isinstance(events[-1], RequestFinished)


def test_an_interval_still_shows_everything_when_the_request_pauses():
    # A reader that has not read even the first token: the bound is reached before the
    # interval, and the pause shows it everything it has to read.
    s = RequestStream("p", abort=lambda *_: None, bound=4, interval=8)
    for t in range(3):
        assert not s.push([Delta("p", 0, [t], [])])
    assert s.push([Delta("p", 0, [3], [])])             # backlog 4 = the bound: pause
    assert _tokens(_drain(s)) == [0, 1, 2, 3]


def test_an_interval_wakes_an_asyncio_reader_only_when_it_has_something_to_read():
    s = RequestStream("w", abort=lambda *_: None, interval=2)
    s.push([Delta("w", 0, [1], [])])
    assert _tokens(_drain(s)) == [1]
    loop, got, thread = _readers_on_a_loop([s])
    s.push([Delta("w", 0, [2], [])])
    assert not got["w"].wait(0.2)                       # one of two: still asleep
    s.push([Delta("w", 0, [3], [])])
    assert got["w"].wait(10)
    thread.join(10)
    loop.close()


def test_next_batch_takes_everything_visible_waits_for_more_and_ends_empty():
    from server.engine.api import ChoiceFinished, RequestFinished, RequestTimings, Usage

    s = RequestStream("b", abort=lambda *_: None, interval=2)

    async def scenario():
        s.push([Delta("b", 0, [1], [])])
        s.push([Delta("b", 0, [2], [])])                # held: one of two
        assert _tokens(await s.next_batch()) == [1]
        later = asyncio.get_running_loop().call_later(0.05, s.push, [Delta("b", 0, [3], [])])
        assert _tokens(await s.next_batch()) == [2, 3]  # waited for the interval's second token
        later.cancel()
        s.push([ChoiceFinished("b", 0, "length"), RequestFinished("b", Usage(1, 3), RequestTimings(0.0))])
        end = await s.next_batch()
        assert isinstance(end[0], ChoiceFinished) and isinstance(end[-1], RequestFinished)
        assert await s.next_batch() == []

    asyncio.run(scenario())
