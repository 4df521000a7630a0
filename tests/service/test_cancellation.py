"""A dropped client or a missed deadline aborts the engine request (its KV blocks are
freed) and what was generated is billed once; the async client streams and cancels."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from client.aio import AsyncClient
from client.client import Client
from client.types import SolError
from tests.service.harness import ADMIN_KEY, RunningServer, wait_for

MSG = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture
def server(tiny_tokenizer, tmp_path):
    from gpt.registry import Registry, publish_checkpoint
    from tests.conftest import make_tiny_model

    registry = Registry(tmp_path / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer, max_seq_len=2048), tiny_tokenizer,
                       {"stage": "base"})
    s = RunningServer(registry.root, tmp_path / "home").start()
    yield s
    s.stop()


@pytest.fixture
def key(server):
    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        return admin.create_key("cancel")[0]


def engine_idle(server) -> bool:
    (model,) = server.app.models.models()
    st = model.engine.stats()
    return st.running == 0 and st.waiting == 0 and st.kv_blocks_used == 0


def test_disconnect_aborts_and_bills_once(server, key):
    with Client(server.target, api_key=key) as c:
        stream = c.chat_stream(MSG, model="tiny", max_tokens=1800, ignore_eos=True, request_id="dropped")
        seen = 0
        with pytest.raises(SolError) as err:
            for chunk in stream:
                seen += sum(len(d.token_ids) for d in chunk.deltas)
                if seen >= 5:
                    stream.close()
        assert err.value.code == grpc.StatusCode.CANCELLED
        wait_for(lambda: engine_idle(server), message="the engine to drop the request and free its blocks")
        wait_for(lambda: not server.app.service.background, message="background billing")
        billed = c.request_usage("dropped")
        assert seen <= billed.completion_tokens < 1800
        assert c.request_usage("dropped") == billed
    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        assert admin.usage().total.completion_tokens == billed.completion_tokens


def test_deadline_aborts(server, key):
    with Client(server.target, api_key=key, retries=0) as c:
        with pytest.raises(SolError) as err:
            c.chat(MSG, model="tiny", max_tokens=1800, ignore_eos=True, request_id="late", timeout=0.3)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: engine_idle(server), message="the engine to drop the request")
        wait_for(lambda: not server.app.service.background, message="background billing")
        billed = c.request_usage("late")
        assert 0 < billed.completion_tokens < 1800


def test_async_client(server, key):
    async def go():
        async with AsyncClient(server.target, api_key=key) as c:
            whole = await c.chat(MSG, model="tiny", max_tokens=6, temperature=0, ignore_eos=True)
            stream = c.chat_stream(MSG, model="tiny", max_tokens=6, temperature=0, ignore_eos=True)
            chunks = [ch async for ch in stream]
            assert stream.text == whole.text
            assert stream.usage.completion_tokens == whole.usage.completion_tokens == 6
            assert chunks[-1].final
            # Many concurrent streams on one channel, one of them cancelled politely.
            # The one to cancel asks for far more than it will get, so the cancel always lands first.
            streams = [c.chat_stream(MSG, model="tiny", max_tokens=1500 if i == 0 else 40, ignore_eos=True)
                       for i in range(20)]

            async def drain(i, s):
                n = 0
                async for _ in s:
                    n += 1
                    if i == 0 and n == 2:
                        await s.cancel()
                return s

            done = await asyncio.gather(*(drain(i, s) for i, s in enumerate(streams)))
            assert done[0].finish_reasons[0] == "abort" and done[0].usage.completion_tokens < 1500
            assert all(s.usage.completion_tokens == 40 for s in done[1:])
    asyncio.run(go())


def test_grace_period_over_cuts_streams_and_bills_them(tiny_tokenizer, tmp_path):
    import threading

    from gpt.registry import Registry, publish_checkpoint
    from server.accounting.ledger_sqlite import SqliteStore
    from tests.conftest import make_tiny_model

    registry = Registry(tmp_path / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer, max_seq_len=2048), tiny_tokenizer,
                       {"stage": "base"})
    s = RunningServer(registry.root, tmp_path / "home", grace_period_s=0.5).start()
    with Client(s.target, admin_key=ADMIN_KEY) as admin:
        key, info = admin.create_key("grace")
    errors, seen = [], []
    first = threading.Event()

    def long_stream() -> None:
        with Client(s.target, api_key=key, retries=0) as c:
            try:
                for chunk in c.chat_stream(MSG, model="tiny", max_tokens=1900, ignore_eos=True):
                    seen.append(sum(len(d.token_ids) for d in chunk.deltas))
                    first.set()
            except SolError as err:
                errors.append(err)

    t = threading.Thread(target=long_stream)
    t.start()
    first.wait(30)
    s.stop()                          # drain: grace 0.5 s, then the stream is cut
    t.join(30)
    assert errors and errors[0].code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    store = SqliteStore(tmp_path / "home" / "ledger.sqlite3")
    (row,) = store.usage(key_id=info.key_id)
    store.close()
    assert row.requests == 1 and sum(seen) <= row.completion_tokens < 1900
