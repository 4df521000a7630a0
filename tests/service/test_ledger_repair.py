"""A ledger that earlier versions let hold non-finite prices and costs is repaired when
the store opens (invalid prices removed, non-finite costs recomputed from their tokens),
and the SQLite ledger, its WAL and SHM files and the usage spool are owner-only."""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import stat

from server.accounting.ledger import Price, UsageRecord
from server.accounting.ledger_redis import P, RedisStore
from server.accounting.ledger_sqlite import SqliteStore
from server.accounting.spool import Spool
from tests.service.conftest import DurableRedis


def record(request_id: str, cost: float = 0.5, model: str = "tiny") -> UsageRecord:
    return UsageRecord(key_id="k1", request_id=request_id, model=model, version=1, prompt_tokens=1000,
                       completion_tokens=500, cached_tokens=0, cost=cost, day="2026-12-07")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sqlite_repair_removes_bad_prices_and_recomputes_infinite_costs(tmp_path, caplog):
    path = tmp_path / "ledger.sqlite3"
    store = SqliteStore(path)
    store.set_price("tiny", Price(1.0, 2.0, 0.5))
    store.set_price("big", Price(1.0, 1.0, 0.5))
    store.record(record("r1"))
    store.record(record("r2", model="big"))
    store.close()
    # What SetPrice used to accept, and what billing at such a price left behind.
    db = sqlite3.connect(path)
    db.execute("UPDATE prices SET prompt_per_1k=1e308, completion_per_1k=? WHERE model='big'", (math.inf,))
    db.execute("UPDATE usage SET cost=? WHERE model='big'", (math.inf,))
    db.execute("UPDATE usage SET cost=? WHERE model='tiny'", (-math.inf,))
    db.execute("UPDATE requests SET record=? WHERE request_id='r2'",
               (json.dumps({**record("r2", model="big").to_dict(), "cost": math.inf}),))
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="sol.ledger"):
        store = SqliteStore(path)
    try:
        assert store.prices() == {"tiny": Price(1.0, 2.0, 0.5)}
        costs = {row.model: row.cost for row in store.usage()}
        # tiny: its tokens at its valid price (1000 x 1.0 + 500 x 2.0 per 1K); big: no valid price left.
        assert costs == {"tiny": 2.0, "big": 0.0}
        assert store.get_record("k1", "r2").cost == 0.0 and store.get_record("k1", "r1").cost == 0.5
        messages = [r.getMessage() for r in caplog.records]
        assert any("removing the invalid price of model big" in m for m in messages)
        assert sum("set to" in m for m in messages) == 3
    finally:
        store.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sol.ledger"):
        SqliteStore(path).close()          # idempotent: nothing left to repair
    assert not caplog.records


def test_redis_repair_removes_bad_prices_and_recomputes_bad_costs(tmp_path, caplog):
    server = DurableRedis(tmp_path)
    server.start()
    try:
        store = RedisStore(server.url)
        store.set_price("tiny", Price(1.0, 2.0, 0.5))
        store.record(record("r1"))
        raw = store._r
        raw.hset(f"{P}prices", "nanny", "nan 1.0 0.5")
        raw.hset(f"{P}prices", "huge", "1e308 1.0 0.5")
        raw.hset(f"{P}prices", "junk", "not a price")
        raw.hset(f"{P}usage:2026-12-07:k1:tiny", "cost", "inf")
        store.close()
        with caplog.at_level(logging.WARNING, logger="sol.ledger"):
            store = RedisStore(server.url)
        assert store.prices() == {"tiny": Price(1.0, 2.0, 0.5)}
        assert [row.cost for row in store.usage()] == [2.0]
        assert sum("removing" in r.getMessage() for r in caplog.records) == 3
        store.close()
    finally:
        server.stop()


def test_ledger_files_and_spool_are_owner_only(tmp_path):
    old = os.umask(0o022)             # the usual umask: files would be 0644
    try:
        path = tmp_path / "ledger.sqlite3"
        store = SqliteStore(path)
        store.record(record("r1"))     # the WAL and SHM files exist while it is open
        for p in (path, tmp_path / "ledger.sqlite3-wal", tmp_path / "ledger.sqlite3-shm"):
            assert p.exists() and mode(p) == 0o600, (p.name, oct(mode(p)))
        store.close()
        # A ledger an earlier version left world-readable is narrowed when opened.
        os.chmod(path, 0o644)
        SqliteStore(path).close()
        assert mode(path) == 0o600
        spool = Spool(tmp_path / "spool" / "usage.jsonl")
        spool.append(record("r2"))
        assert mode(spool.path) == 0o600
    finally:
        os.umask(old)
