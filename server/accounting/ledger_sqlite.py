"""The embedded ledger store: one SQLite file under $SOL_HOME, so `sol serve` meters
every token with no external service. Same semantics as the Redis store; several
processes on one machine may share the file (SQLite's locking, WAL journal)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from server.accounting.ledger import (
    IDEMPOTENCY_TTL_S,
    RATE_WINDOW_S,
    RESERVATION_TTL_S,
    Admission,
    KeyInfo,
    Price,
    UsageRecord,
    UsageRow,
    WindowState,
    is_served,
    merge_attempt,
    refusal,
    window_state,
)
from server.accounting.ledger_repair import repair_sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, key_hash TEXT UNIQUE NOT NULL, name TEXT NOT NULL, prefix TEXT NOT NULL,
    created INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, token_budget INTEGER, rpm INTEGER,
    tpm INTEGER, tokens_used INTEGER NOT NULL DEFAULT 0, share REAL NOT NULL DEFAULT 1.0,
    band TEXT NOT NULL DEFAULT 'interactive');
CREATE TABLE IF NOT EXISTS prices (
    model TEXT PRIMARY KEY, prompt_per_1k REAL NOT NULL, completion_per_1k REAL NOT NULL,
    cached_discount REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    key_id TEXT NOT NULL, request_id TEXT NOT NULL, ts REAL NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (key_id, request_id));
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL, requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    cost REAL NOT NULL, PRIMARY KEY (day, key_id, model));
-- The rate limits' sliding window: one row per request admitted in the last minute, with
-- its reservation (then its usage, once recorded).
CREATE TABLE IF NOT EXISTS rate_window (
    key_id TEXT NOT NULL, request_id TEXT NOT NULL, ts REAL NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, request_id));
CREATE INDEX IF NOT EXISTS rate_window_key_ts ON rate_window (key_id, ts);
CREATE INDEX IF NOT EXISTS rate_window_ts ON rate_window (ts);
-- Fixed-minute counters of earlier versions, replaced by rate_window.
DROP TABLE IF EXISTS windows;
CREATE TABLE IF NOT EXISTS running (
    key_id TEXT NOT NULL, request_id TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key_id, request_id));
CREATE TABLE IF NOT EXISTS reservations (
    key_id TEXT NOT NULL, request_id TEXT NOT NULL, tokens INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (key_id, request_id));
"""

_KEY_COLUMNS = "key_id, name, prefix, created, revoked, token_budget, rpm, tpm, tokens_used, share, band"
# Columns added after the first release: (name, definition) for ALTER TABLE on old files.
_KEY_MIGRATIONS = (("share", "REAL NOT NULL DEFAULT 1.0"), ("band", "TEXT NOT NULL DEFAULT 'interactive'"))
# Crash-safe metering: server instances with their lease and process marker, and the
# checkpoints (write-ahead usage) of running attempts. Run claims and reservations gain
# the instance that holds them (`_migrate_instances`).
INSTANCES_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance TEXT PRIMARY KEY, slot TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    marker TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meter (
    key_id TEXT NOT NULL, request_id TEXT NOT NULL, attempt TEXT NOT NULL, instance TEXT NOT NULL,
    record TEXT NOT NULL, PRIMARY KEY (key_id, request_id, attempt));
CREATE INDEX IF NOT EXISTS meter_instance ON meter (instance);
"""


def _migrate_instances(db: sqlite3.Connection) -> None:
    db.executescript(INSTANCES_SCHEMA)
    for table in ("running", "reservations"):
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if "instance" not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN instance TEXT NOT NULL DEFAULT ''")


def process_marker(pid: int) -> str | None:
    """What tells this run of process `pid` from a later process given the same pid: the
    boot id and the process's start time (Linux), else just its liveness. None: no such
    process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            start = f.read().rpartition(")")[2].split()[19]
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f"{f.read().strip()}:{start}"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "alive"




def private_files(path: Path) -> None:
    """The ledger holds key hashes and every key's usage: owner-only (0600). SQLite gives
    its -wal and -shm files the database file's mode, so the file is created 0600 before
    SQLite opens it; files an earlier version left readable are narrowed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)


def _key(row) -> KeyInfo:
    return KeyInfo(key_id=row[0], name=row[1], prefix=row[2], created=row[3], revoked=bool(row[4]),
                   token_budget=row[5], rpm=row[6], tpm=row[7], tokens_used=row[8], share=row[9], band=row[10])


class SqliteStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private_files(self.path)
        # One connection guarded by a lock: the service calls from a small thread pool and
        # SQLite serialises writers anyway.
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed usage record survives a power cut, as Redis AOF fsync does.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(keys)")}
            for column, definition in _KEY_MIGRATIONS:
                if column not in have:     # a ledger written before the column existed
                    self._db.execute(f"ALTER TABLE keys ADD COLUMN {column} {definition}")
            _migrate_instances(self._db)
            repair_sqlite(self._db, str(self.path))
        self.instance = ""          # this process's server instance, once registered
        self._registration: tuple[str, str, int, str] = ("", "", 0, "")

    @contextmanager
    def _tx(self, durable: bool = True):
        """One write transaction. `durable=False` for rows that only matter while this
        process runs (run claims, quota reservations, the rate window: each lapses on its
        own): committed without an fsync (WAL with synchronous=NORMAL; the next durable
        commit syncs them too, and a power cut can only lose them, never corrupt the
        file). Every request claims its id and ends with its usage record, all under one
        lock: with an fsync each, a burst of 32 streaming requests queued 5-95 ms at the
        claim (demo model, 2 cores), most of its time to first token."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def ping(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1")

    def claim_fingerprint(self, value: str) -> str:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('pepper', ?)", (value,))
            return db.execute("SELECT value FROM meta WHERE name='pepper'").fetchone()[0]

    # --- keys -------------------------------------------------------------------------------
    def create_key(self, key: KeyInfo, key_hash: str) -> None:
        with self._tx() as db:
            db.execute(f"INSERT INTO keys ({_KEY_COLUMNS}, key_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (key.key_id, key.name, key.prefix, key.created, int(key.revoked), key.token_budget,
                        key.rpm, key.tpm, key.tokens_used, key.share, key.band, key_hash))

    def key_by_hash(self, key_hash: str) -> KeyInfo | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_hash=?", (key_hash,)).fetchone()
        return _key(row) if row else None

    def get_key(self, key_id: str) -> KeyInfo | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id=?", (key_id,)).fetchone()
        return _key(row) if row else None

    def revoke_key(self, key_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE keys SET revoked=1 WHERE key_id=? AND revoked=0", (key_id,))
            return cur.rowcount > 0

    def update_key(self, key_id: str, share: float | None = None, band: str | None = None) -> KeyInfo | None:
        with self._tx() as db:
            db.execute("UPDATE keys SET share=COALESCE(?, share), band=COALESCE(?, band) WHERE key_id=?",
                       (share, band, key_id))
            row = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id=?", (key_id,)).fetchone()
        return _key(row) if row else None

    def list_keys(self, include_revoked: bool = False) -> list[KeyInfo]:
        where = "" if include_revoked else "WHERE revoked=0"
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys {where} ORDER BY created, key_id").fetchall()
        return [_key(r) for r in rows]

    # --- prices -----------------------------------------------------------------------------
    def set_price(self, model: str, price: Price) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO prices VALUES (?,?,?,?)",
                       (model, price.prompt_per_1k, price.completion_per_1k, price.cached_discount))

    def prices(self) -> dict[str, Price]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM prices").fetchall()
        return {r[0]: Price(r[1], r[2], r[3]) for r in rows}

    # --- quotas -----------------------------------------------------------------------------
    def admit(self, key: KeyInfo, request_id: str, estimate_tokens: int, now: float) -> Admission:
        # BEGIN IMMEDIATE takes SQLite's write lock before reading, so check-and-reserve is
        # one step for every connection and process sharing the file.
        limited = key.rpm is not None or key.tpm is not None
        with self._tx(durable=False) as db:
            db.execute("DELETE FROM reservations WHERE expires < ?", (now,))
            db.execute("DELETE FROM rate_window WHERE ts <= ?", (now - RATE_WINDOW_S,))
            row = db.execute("SELECT tokens_used FROM keys WHERE key_id=?", (key.key_id,)).fetchone()
            used = row[0] if row else 0
            reserved = db.execute("SELECT COALESCE(SUM(tokens), 0) FROM reservations WHERE key_id=?",
                                  (key.key_id,)).fetchone()[0]
            fresh = KeyInfo(**{**key.__dict__, "tokens_used": used})
            window = WindowState()
            if limited:
                requests, tokens = db.execute("SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM rate_window "
                                              "WHERE key_id=? AND request_id != ?",
                                              (key.key_id, request_id)).fetchone()
                window = WindowState(requests, tokens)
            refused = refusal(fresh, window, reserved, estimate_tokens)
            if refused:
                if refused.limit in ("rpm", "tpm"):
                    # Only a refusal needs the entries themselves, for a truthful retry-after.
                    entries = db.execute("SELECT ts, tokens FROM rate_window WHERE key_id=? AND request_id != ? "
                                         "ORDER BY ts", (key.key_id, request_id)).fetchall()
                    refused = refusal(fresh, window_state(entries, key, estimate_tokens, now), reserved,
                                      estimate_tokens)
                return refused
            if limited:
                db.execute("INSERT OR REPLACE INTO rate_window VALUES (?,?,?,?)",
                           (key.key_id, request_id, now, estimate_tokens))
            if key.token_budget is not None:
                db.execute("INSERT OR REPLACE INTO reservations (key_id, request_id, tokens, expires, instance) "
                           "VALUES (?,?,?,?,?)",
                           (key.key_id, request_id, estimate_tokens, now + RESERVATION_TTL_S, self.instance))
        return Admission(True, used=used)

    def release(self, key_id: str, request_id: str) -> None:
        with self._tx(durable=False) as db:
            db.execute("DELETE FROM reservations WHERE key_id=? AND request_id=?", (key_id, request_id))
            # A request that ran is settled by `record` and stays in the window.
            if not db.execute("SELECT 1 FROM requests WHERE key_id=? AND request_id=?",
                              (key_id, request_id)).fetchone():
                db.execute("DELETE FROM rate_window WHERE key_id=? AND request_id=?", (key_id, request_id))

    # --- usage ------------------------------------------------------------------------------
    def record(self, rec: UsageRecord) -> bool:
        with self._tx() as db:
            return self._record(db, rec)

    def _record(self, db: sqlite3.Connection, rec: UsageRecord) -> bool:
        """Apply `rec` in the open transaction `db` (see ledger.merge_attempt)."""
        owner = rec.instance
        # The attempt's claim and reservation end with it (a cut record's were freed with
        # its instance; a retry running elsewhere holds its own).
        db.execute("DELETE FROM reservations WHERE key_id=? AND request_id=? AND instance=?",
                   (rec.key_id, rec.request_id, owner))
        db.execute("DELETE FROM running WHERE key_id=? AND request_id=? AND instance=?",
                   (rec.key_id, rec.request_id, owner))
        db.execute("DELETE FROM meter WHERE key_id=? AND request_id=? AND attempt=?",
                   (rec.key_id, rec.request_id, rec.attempt))
        row = db.execute("SELECT record FROM requests WHERE key_id=? AND request_id=?",
                         (rec.key_id, rec.request_id)).fetchone()
        merged = merge_attempt(json.loads(row[0]) if row else None, rec)
        if merged is None:
            return False
        stored, delta = merged
        db.execute("INSERT OR REPLACE INTO requests VALUES (?,?,?,?)",
                   (rec.key_id, rec.request_id, stored["ts"], json.dumps(stored)))
        db.execute("INSERT INTO usage VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(day, key_id, model) DO UPDATE SET "
                   "requests=requests+excluded.requests, prompt_tokens=prompt_tokens+excluded.prompt_tokens, "
                   "completion_tokens=completion_tokens+excluded.completion_tokens, "
                   "cached_tokens=cached_tokens+excluded.cached_tokens, cost=cost+excluded.cost",
                   (rec.day, rec.key_id, rec.model, 0 if row else 1, delta.prompt_tokens, delta.completion_tokens,
                    delta.cached_tokens, delta.cost))
        db.execute("UPDATE keys SET tokens_used=tokens_used+? WHERE key_id=?", (delta.total_tokens, rec.key_id))
        # Settle the rate window: the reservation becomes the actual usage, freeing the rest.
        db.execute("UPDATE rate_window SET tokens=? WHERE key_id=? AND request_id=?",
                   (stored["prompt_tokens"] + stored["completion_tokens"], rec.key_id, rec.request_id))
        db.execute("DELETE FROM requests WHERE ts < ?", (rec.ts - IDEMPOTENCY_TTL_S,))
        return True

    def claim(self, key_id: str, request_id: str, now: float) -> str:
        with self._tx(durable=False) as db:
            row = db.execute("SELECT record FROM requests WHERE key_id=? AND request_id=?",
                             (key_id, request_id)).fetchone()
            if row and is_served(json.loads(row[0])):
                return "billed"
            db.execute("DELETE FROM running WHERE expires < ?", (now,))
            cur = db.execute("INSERT OR IGNORE INTO running (key_id, request_id, expires, instance) VALUES (?,?,?,?)",
                             (key_id, request_id, now + RESERVATION_TTL_S, self.instance))
            return "ok" if cur.rowcount else "running"

    def unclaim(self, key_id: str, request_id: str) -> None:
        with self._tx(durable=False) as db:
            db.execute("DELETE FROM running WHERE key_id=? AND request_id=?", (key_id, request_id))

    # --- crash-safe metering ------------------------------------------------------------------
    def register_instance(self, instance: str, slot: str, lease_s: float, now: float) -> None:
        pid = os.getpid()
        self._registration = (slot, socket.gethostname(), pid, process_marker(pid) or "")
        with self._tx() as db:
            # This replica's earlier run is dead now, whatever its lease says.
            db.execute("UPDATE instances SET expires=0 WHERE slot=? AND instance != ?", (slot, instance))
            db.execute("INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?)",
                       (instance, *self._registration, now + lease_s))
        self.instance = instance

    def heartbeat(self, instance: str, lease_s: float, now: float) -> None:
        with self._tx(durable=False) as db:
            # Re-registered if it was reaped meanwhile (its lease lapsed while it stalled):
            # what it runs now is checkpointed and billed again from here on.
            db.execute("INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?)",
                       (instance, *self._registration, now + lease_s))

    def checkpoint(self, rec: UsageRecord) -> None:
        # Not fsynced: a committed WAL transaction survives the process being killed (only a
        # power cut could lose it, and the checkpoint before it stays).
        with self._tx(durable=False) as db:
            db.execute("INSERT OR REPLACE INTO meter VALUES (?,?,?,?,?)",
                       (rec.key_id, rec.request_id, rec.attempt, rec.instance, json.dumps(rec.to_dict())))

    def _dead_instances(self, db: sqlite3.Connection, now: float) -> list[str]:
        host = socket.gethostname()
        dead = []
        for instance, ihost, pid, marker, expires in db.execute(
                "SELECT instance, host, pid, marker, expires FROM instances WHERE instance != ?", (self.instance,)):
            # On this host a process that is gone (or whose pid now names another process)
            # is dead at once; elsewhere only its lease tells.
            if expires < now or (ihost == host and process_marker(pid) != marker):
                dead.append(instance)
        # Checkpoints of instances no longer registered (reaped before a late spool replay
        # wrote them) are as dead.
        dead += [r[0] for r in db.execute("SELECT DISTINCT instance FROM meter WHERE instance NOT IN "
                                          "(SELECT instance FROM instances)")]
        return dead

    def reap(self, now: float) -> int:
        # Looked for outside a write transaction: every replica asks every few seconds,
        # and there is rarely anything to reap.
        with self._lock:
            if not self._dead_instances(self._db, now):
                return 0
        billed = 0
        with self._tx() as db:
            for instance in self._dead_instances(db, now):
                for (record,) in db.execute("SELECT record FROM meter WHERE instance=?", (instance,)).fetchall():
                    rec = UsageRecord.from_dict({**json.loads(record), "cut": True})
                    billed += self._record(db, rec)
                db.execute("DELETE FROM meter WHERE instance=?", (instance,))
                db.execute("DELETE FROM running WHERE instance=?", (instance,))
                db.execute("DELETE FROM reservations WHERE instance=?", (instance,))
                db.execute("DELETE FROM instances WHERE instance=?", (instance,))
        return billed

    def has_record(self, key_id: str, request_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM requests WHERE key_id=? AND request_id=?",
                                    (key_id, request_id)).fetchone() is not None

    def get_record(self, key_id: str, request_id: str) -> UsageRecord | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM requests WHERE key_id=? AND request_id=?",
                                   (key_id, request_id)).fetchone()
        return UsageRecord.from_dict(json.loads(row[0])) if row else None

    def usage(self, key_id: str = "", model: str = "", from_day: str = "", to_day: str = "") -> list[UsageRow]:
        clauses, args = [], []
        for column, op, value in (("key_id", "=", key_id), ("model", "=", model),
                                  ("day", ">=", from_day), ("day", "<=", to_day)):
            if value:
                clauses.append(f"{column} {op} ?")
                args.append(value)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            rows = self._db.execute("SELECT key_id, model, day, requests, prompt_tokens, completion_tokens, "
                                    f"cached_tokens, cost FROM usage {where} ORDER BY day, key_id, model",
                                    args).fetchall()
        return [UsageRow(*r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
