"""Fair share through the service: a key's share and band in both ledger stores (and in a
ledger written before they existed), CreateKey/UpdateKey and their errors, the policy in
ListModels, and the per-key waiting bound as RESOURCE_EXHAUSTED with a retry hint."""

from __future__ import annotations

import sqlite3
import threading

import grpc
import pytest

from client.client import Client
from client.types import SolError
from server.accounting.ledger import KeyInfo
from server.accounting.ledger_sqlite import SqliteStore
from server.config import engine_config
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny, wait_for


def test_both_stores_keep_and_update_a_keys_share_and_band(store):
    store.create_key(KeyInfo("k1", "team", "sk-x", 1, share=2.5, band="batch"), "h1")
    assert (store.get_key("k1").share, store.get_key("k1").band) == (2.5, "batch")
    updated = store.update_key("k1", share=0.5)
    assert (updated.share, updated.band) == (0.5, "batch")
    assert store.update_key("k1", band="interactive").band == "interactive"
    assert store.key_by_hash("h1").share == 0.5
    assert store.update_key("nope", share=3.0) is None
    store.create_key(KeyInfo("k2", "plain", "sk-y", 2), "h2")
    assert (store.get_key("k2").share, store.get_key("k2").band) == (1.0, "interactive")


def test_sqlite_ledger_of_an_earlier_version_gets_the_columns(tmp_path):
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE keys (key_id TEXT PRIMARY KEY, key_hash TEXT UNIQUE NOT NULL, name TEXT NOT NULL,
            prefix TEXT NOT NULL, created INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
            token_budget INTEGER, rpm INTEGER, tpm INTEGER, tokens_used INTEGER NOT NULL DEFAULT 0);
        INSERT INTO keys VALUES ('old', 'hash', 'legacy', 'sk-o', 1, 0, NULL, 60, NULL, 42);
    """)
    db.commit()
    db.close()
    store = SqliteStore(path)
    key = store.get_key("old")
    assert (key.share, key.band, key.rpm, key.tokens_used) == (1.0, "interactive", 60, 42)
    assert store.update_key("old", share=3.0).share == 3.0
    store.close()


@pytest.fixture
def server(tiny_tokenizer, tmp_path):
    # One sequence per step: a second request of a key waits, a third is over the bound.
    s = RunningServer(publish_tiny(tmp_path, tiny_tokenizer), tmp_path / "home",
                      engine=engine_config(max_num_seqs=1, max_waiting_per_tenant=1)).start()
    yield s
    s.stop()


def test_keys_shares_and_bands_and_the_waiting_bound(server):
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
        clear, info = admin.create_key("bulk", share=2.0, band="batch")
        assert (info.share, info.band) == (2.0, "batch")
        other, _ = admin.create_key("other")
        assert admin.update_key(info.key_id, share=4.0).share == 4.0
        listed = {k.key_id: k for k in admin.list_keys()}
        assert (listed[info.key_id].share, listed[info.key_id].band) == (4.0, "batch")
        for bad in ({"share": 0.0}, {"share": -1.0}, {"band": "vip"}):
            with pytest.raises(SolError) as err:
                admin.update_key(info.key_id, **bad)
            assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(SolError) as err:
            admin.create_key("x", share=1e9)
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "share must be in" in err.value.message
        with pytest.raises(SolError) as err:
            admin.update_key("missing", share=2.0)
        assert err.value.code is grpc.StatusCode.NOT_FOUND

    with Client(server.target, api_key=clear, retries=0) as c, Client(server.target, api_key=other,
                                                                        retries=0) as o:
        assert [m.scheduling for m in c.list_models()] == ["fair"]
        long = {"max_tokens": 200, "ignore_eos": True, "temperature": 0.0}
        running = c.complete_stream("a", "tiny", **long)
        first = iter(running)
        next(first)                                   # it holds the one slot
        waiting: list[object] = []
        second = threading.Thread(target=lambda: waiting.append(c.complete("b", "tiny", priority=3, **long)))
        second.start()
        # Both of the key's requests submitted to the engine (a paused first request may be
        # queued again too, so the waiting count alone does not say the second one is in).
        def submitted() -> int:
            return sum(1 for j in list(server.app.service.inflight.jobs.values())
                       if j.key.key_id == info.key_id and j.stream is not None)

        wait_for(lambda: submitted() == 2 and server.app.models.stats()[0][2].waiting >= 1,
                 message="the second request waiting")
        with pytest.raises(SolError) as err:
            c.complete("c", "tiny", **long)
        assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-waiting-per-key" in err.value.message and err.value.retry_after_s
        # Another key is not affected by this key's bound.
        other_out = []
        third = threading.Thread(target=lambda: other_out.append(o.complete("d", "tiny", max_tokens=2)))
        third.start()
        running.cancel()
        for _ in first:
            pass
        second.join(60)
        third.join(60)
        assert waiting and other_out
