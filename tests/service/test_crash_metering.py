"""Crash-safe metering in the ledger stores (both, with the same semantics): checkpoints
of a running attempt, server instances with a lease, and the reaping of dead instances
into cut bills that free their request ids and budget reservations; a cut bill is
superseded by its attempt's final record, and a cut request id may run again."""

from __future__ import annotations

import time

from server.accounting.ledger import KeyInfo, UsageRecord, utc_day

LEASE = 10.0


def make_key(store, key_id: str = "k1", **limits) -> KeyInfo:
    key = KeyInfo(key_id=key_id, name="crash", prefix="sk-sol-crash", created=int(time.time()), **limits)
    store.create_key(key, "hash-" + key_id)
    return key


def rec(request_id: str, completion: int, attempt: str, prompt: int = 10, key_id: str = "k1") -> UsageRecord:
    return UsageRecord(key_id=key_id, request_id=request_id, model="tiny", version=1, prompt_tokens=prompt,
                       completion_tokens=completion, cached_tokens=0, cost=float(completion), day=utc_day(),
                       attempt=attempt)


def totals(store, key_id: str = "k1") -> tuple[int, int, int]:
    rows = store.usage(key_id=key_id)
    return (sum(r.requests for r in rows), sum(r.completion_tokens for r in rows), store.get_key(key_id).tokens_used)


def test_a_restarted_instance_bills_its_predecessors_checkpoints_and_frees_what_it_held(store):
    key = make_key(store, token_budget=1000)
    now = time.time()
    store.register_instance("A", "host-1", LEASE, now)
    assert store.claim("k1", "r1", now) == "ok"
    assert store.admit(key, "r1", 900, now).admitted
    store.checkpoint(rec("r1", 20, "A.1"))
    store.checkpoint(rec("r1", 40, "A.1"))          # replaces the first
    assert totals(store) == (0, 0, 0)               # a checkpoint is not a bill
    assert store.reap(now) == 0                     # A is alive

    # A is killed; the replica restarts in its slot as B.
    store.register_instance("B", "host-1", LEASE, now)
    assert store.reap(now) == 1
    assert totals(store) == (1, 40, 50)
    cut = store.get_record("k1", "r1")
    assert cut.completion_tokens == 40 and cut.cut
    # Freed at once, not after a 15-minute TTL: the request id runs again, the budget is back.
    assert store.claim("k1", "r1", now) == "ok"
    assert store.admit(key, "r1", 900, now).admitted
    assert store.reap(now) == 0                     # nothing is billed twice

    # The retry's usage adds to the cut run's (both were delivered); one request.
    assert store.record(rec("r1", 30, "B.1"))
    assert totals(store) == (1, 70, 90)
    assert store.claim("k1", "r1", now) == "billed"
    assert not store.record(rec("r1", 30, "B.1"))   # replayed: counted once
    # A's own final record arriving late (it was partitioned, not dead) supersedes its cut
    # bill: the difference is billed, once.
    assert store.record(rec("r1", 55, "A.1"))
    assert not store.record(rec("r1", 55, "A.1"))
    assert totals(store) == (1, 85, 105)
    assert not store.get_record("k1", "r1").cut


def test_a_lapsed_lease_is_dead_to_every_replica(store):
    make_key(store)
    now = time.time()
    store.register_instance("C", "host-2", LEASE, now)
    store.claim("k1", "r2", now)
    store.checkpoint(rec("r2", 16, "C.1"))
    store.register_instance("D", "host-3", LEASE, now)      # another replica
    assert store.reap(now + LEASE / 2) == 0
    store.heartbeat("C", LEASE, now + LEASE / 2)
    assert store.reap(now + LEASE) == 0                     # renewed
    assert store.reap(now + 2 * LEASE) == 1
    assert totals(store) == (1, 16, 26)
    assert store.claim("k1", "r2", now) == "ok"


def test_a_finished_attempt_leaves_no_checkpoint_behind(store):
    make_key(store)
    now = time.time()
    store.register_instance("E", "host-4", LEASE, now)
    store.claim("k1", "r3", now)
    store.checkpoint(rec("r3", 16, "E.1"))
    assert store.record(rec("r3", 20, "E.1"))
    store.register_instance("F", "host-4", LEASE, now)
    assert store.reap(now) == 0
    assert totals(store) == (1, 20, 30)
    assert store.claim("k1", "r3", now) == "billed"


def test_the_embedded_store_sees_a_dead_process_at_once(tmp_path):
    """No lease to wait out on one machine: a registered instance whose process is gone
    (pid + start-time marker) is reaped by the next reap of any process."""
    import subprocess
    import sys

    from server.accounting.ledger_sqlite import SqliteStore

    path = tmp_path / "ledger.sqlite3"
    store = SqliteStore(path)
    make_key(store)
    child = (f"import time; from server.accounting.ledger_sqlite import SqliteStore; "
             f"from tests.service.test_crash_metering import rec; s = SqliteStore({str(path)!r}); "
             f"s.register_instance('G', 'other-slot', 3600.0, time.time()); s.claim('k1', 'r4', time.time()); "
             f"s.checkpoint(rec('r4', 32, 'G.1'))")
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    store.register_instance("H", "my-slot", LEASE, time.time())
    assert store.reap(time.time()) == 1                # the lease had an hour left
    assert totals(store) == (1, 32, 42)
    assert store.claim("k1", "r4", time.time()) == "ok"
    store.close()
