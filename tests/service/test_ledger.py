"""The ledger contract, run against both stores (Redis and the embedded SQLite)."""

from __future__ import annotations

import threading
import time

import pytest

from server.accounting.ledger import KeyInfo, Price, UsageRecord, utc_day


def make_key(store, key_id="k1", **limits) -> KeyInfo:
    key = KeyInfo(key_id=key_id, name="team", prefix="sk-sol-abc", created=int(time.time()), **limits)
    store.create_key(key, "hash-" + key_id)
    return key


def rec(request_id, key_id="k1", model="tiny", prompt=10, completion=5, cached=0, cost=0.0, day=None):
    return UsageRecord(key_id=key_id, request_id=request_id, model=model, version=1, prompt_tokens=prompt,
                       completion_tokens=completion, cached_tokens=cached, cost=cost, day=day or utc_day())


def test_keys_roundtrip(store):
    key = make_key(store, token_budget=100, rpm=5)
    assert store.key_by_hash("hash-k1") == key
    assert store.key_by_hash("nope") is None
    assert [k.key_id for k in store.list_keys()] == ["k1"]
    assert store.revoke_key("k1") is True
    assert store.revoke_key("k1") is False
    assert store.revoke_key("missing") is False
    assert store.key_by_hash("hash-k1").revoked
    assert store.list_keys() == []
    assert [k.key_id for k in store.list_keys(include_revoked=True)] == ["k1"]


def test_record_is_idempotent_and_aggregates(store):
    make_key(store)
    assert store.record(rec("r1", prompt=10, completion=5, cached=4, cost=0.5))
    assert not store.record(rec("r1", prompt=10, completion=5, cached=4, cost=0.5))
    assert store.record(rec("r2", prompt=3, completion=2, cost=0.25))
    assert store.record(rec("r3", model="other", prompt=1, completion=1))
    assert store.has_record("k1", "r1") and not store.has_record("k1", "r9")
    # A request id belongs to its key: another key may use the same id.
    make_key(store, "k2")
    assert store.record(rec("r1", key_id="k2"))
    rows = {(r.key_id, r.model): r for r in store.usage()}
    tiny = rows[("k1", "tiny")]
    assert (tiny.requests, tiny.prompt_tokens, tiny.completion_tokens, tiny.cached_tokens) == (2, 13, 7, 4)
    assert abs(tiny.cost - 0.75) < 1e-9
    assert [r.model for r in store.usage(key_id="k1", model="other")] == ["other"]
    assert store.get_key("k1").tokens_used == 22


def test_usage_by_day(store):
    make_key(store)
    store.record(rec("a", day="2026-01-01"))
    store.record(rec("b", day="2026-01-02"))
    store.record(rec("c", day="2026-01-03"))
    assert [r.day for r in store.usage(from_day="2026-01-02")] == ["2026-01-02", "2026-01-03"]
    assert [r.day for r in store.usage(from_day="2026-01-02", to_day="2026-01-02")] == ["2026-01-02"]


def test_prices(store):
    store.set_price("tiny", Price(1.0, 2.0, 0.25))
    assert store.prices() == {"tiny": Price(1.0, 2.0, 0.25)}


def test_rpm_limit(store):
    key = make_key(store, rpm=3)
    now = time.time()
    results = [store.admit(key, f"r{i}", 10, now) for i in range(4)]
    assert [a.admitted for a in results] == [True, True, True, False]
    assert "requests per minute" in results[-1].reason and results[-1].retry_after_s > 0
    # The next window opens again.
    assert store.admit(key, "r9", 10, now + 60).admitted


def test_tpm_limit(store):
    key = make_key(store, tpm=20)
    now = time.time()
    assert store.admit(key, "r1", 10, now).admitted
    store.record(rec("r1", prompt=15, completion=10))
    refused = store.admit(key, "r2", 10, time.time())
    assert not refused.admitted and "tokens per minute" in refused.reason


def test_budget_reserves_and_settles(store):
    key = make_key(store, token_budget=100)
    now = time.time()
    assert store.admit(key, "r1", 60, now).admitted
    # 60 reserved: a second request that may need 60 must wait for the first.
    second = store.admit(key, "r2", 60, now)
    assert not second.admitted and second.retry_after_s > 0
    store.record(rec("r1", prompt=20, completion=10))     # settles at 30 used
    assert store.admit(key, "r2", 60, now).admitted
    store.release("k1", "r2")
    spent = store.admit(key, "r3", 71, now)
    assert not spent.admitted and spent.retry_after_s == 0 and "lower max_tokens" in spent.reason


def test_concurrent_admission_never_overspends(store):
    key = make_key(store, token_budget=1000)
    admitted = []

    def worker(i):
        if store.admit(key, f"r{i}", 100, time.time()).admitted:
            admitted.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10


def test_concurrent_records_count_once(store):
    make_key(store)

    def worker():
        for i in range(50):
            store.record(rec(f"r{i}", prompt=1, completion=1))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (row,) = store.usage()
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (50, 50, 50)


def test_get_record(store):
    make_key(store)
    r = rec("r1", prompt=7, completion=3, cached=2, cost=0.1)
    store.record(r)
    assert store.get_record("k1", "r1") == r
    assert store.get_record("k1", "r2") is None
    assert store.get_record("k2", "r1") is None


def test_pepper_fingerprint_is_claimed_once(store):
    from server.accounting.auth import check_pepper

    assert store.claim_fingerprint("a") == "a"
    assert store.claim_fingerprint("b") == "a"
    # The store already holds fingerprint "a": any real pepper is refused.
    with pytest.raises(ValueError, match="SOL_KEY_PEPPER"):
        check_pepper(store, "pepper-1")


def test_claim_is_single_flight(store):
    make_key(store)
    now = time.time()
    assert store.claim("k1", "r1", now) == "ok"
    assert store.claim("k1", "r1", now) == "running"
    assert store.claim("k2", "r1", now) == "ok"                 # ids are per key
    store.unclaim("k1", "r1")
    assert store.claim("k1", "r1", now) == "ok"
    store.record(rec("r1"))                                      # recording ends the claim
    assert store.claim("k1", "r1", now) == "billed"


def test_sqlite_commits_run_state_without_fsync_and_usage_with_it(tmp_path):
    """Run claims and quota reservations only matter while this process runs: they commit
    without an fsync (WAL, synchronous=NORMAL), and the connection is back to FULL for the
    usage records that bill. Both kinds are committed: another connection sees them."""
    import sqlite3

    from server.accounting.ledger_sqlite import SqliteStore

    store = SqliteStore(tmp_path / "ledger.db")
    key = make_key(store, token_budget=1000)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)

    def sync_modes(action) -> list[str]:
        statements.clear()
        action()
        return [s for s in statements if s.upper().startswith("PRAGMA SYNCHRONOUS")]

    assert sync_modes(lambda: store.claim("k1", "r1", time.time())) == ["PRAGMA synchronous=NORMAL",
                                                                        "PRAGMA synchronous=FULL"]
    assert sync_modes(lambda: store.admit(key, "r1", 10, time.time())).count("PRAGMA synchronous=NORMAL") == 1
    assert sync_modes(lambda: store.record(rec("r1"))) == []
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2     # FULL
    other = sqlite3.connect(tmp_path / "ledger.db")
    assert other.execute("SELECT COUNT(*) FROM requests WHERE request_id='r1'").fetchone()[0] == 1
    assert store.claim("k1", "r2", time.time()) == "ok"
    assert other.execute("SELECT COUNT(*) FROM running WHERE request_id='r2'").fetchone()[0] == 1
    other.close()
