"""The spool: fsynced appends, in-order idempotent replay, survival of a torn line and
of a crash mid-replay."""

from __future__ import annotations

import time

import pytest

from server.accounting.ledger import StoreUnavailable, UsageRecord, utc_day
from server.accounting.spool import Spool


def rec(i: int) -> UsageRecord:
    return UsageRecord(key_id="k", request_id=f"r{i}", model="m", version=1, prompt_tokens=i, completion_tokens=1,
                       cached_tokens=0, cost=0.0, day=utc_day(), ts=time.time())


def test_append_and_replay_in_order(tmp_path):
    spool = Spool(tmp_path / "s.jsonl")
    for i in range(5):
        spool.append(rec(i))
    assert len(Spool(tmp_path / "s.jsonl")) == 5          # durable: a new process sees them
    seen = []
    assert spool.replay(seen.append) == 5
    assert [r.request_id for r in seen] == [f"r{i}" for i in range(5)]
    assert len(spool) == 0 and spool.records() == []


def test_failed_replay_keeps_everything(tmp_path):
    spool = Spool(tmp_path / "s.jsonl")
    for i in range(3):
        spool.append(rec(i))

    def flaky(r):
        if r.request_id == "r1":
            raise StoreUnavailable("down again")

    with pytest.raises(StoreUnavailable):
        spool.replay(flaky)
    assert len(spool) == 3 and [r.request_id for r in spool.records()] == ["r0", "r1", "r2"]


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "s.jsonl"
    spool = Spool(path)
    spool.append(rec(0))
    with open(path, "a") as f:
        f.write('{"key_id": "k", "request_')           # a crash mid-write
    assert [r.request_id for r in Spool(path).records()] == ["r0"]


def test_replay_twice_counts_once(store, tmp_path):
    """A crash after applying but before truncating replays again: the store's
    idempotency keeps the totals exact."""
    from server.accounting.ledger import KeyInfo

    store.create_key(KeyInfo(key_id="k", name="n", prefix="p", created=0), "h")
    spool = Spool(tmp_path / "s.jsonl")
    for i in range(4):
        spool.append(rec(i))
    for r in spool.records():                            # the "crashed" first replay
        store.record(r)
    assert spool.replay(store.record) == 4
    (row,) = store.usage()
    assert (row.requests, row.prompt_tokens) == (4, 0 + 1 + 2 + 3)
