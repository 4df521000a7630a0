"""An append-only, fsynced spool of usage records for when the ledger store is away.

Each line is one JSON record, written and fsynced before the request's response is
considered billed. Replay applies lines in order through an idempotent store, and only
then truncates the file, so a crash mid-replay replays again without counting twice.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from server.accounting.ledger import UsageRecord


class Spool:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._count = sum(1 for _ in self._lines())

    def __len__(self) -> int:
        return self._count

    def _lines(self):
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                # A torn last line (crash mid-write) was never acknowledged: skip it.
                if line.endswith("}"):
                    yield line

    def append(self, rec: UsageRecord) -> None:
        data = (json.dumps(rec.to_dict(), sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._count += 1

    def records(self) -> list[UsageRecord]:
        out = []
        for line in self._lines():
            try:
                out.append(UsageRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError):
                continue
        return out

    def replay(self, apply: Callable[[UsageRecord], object]) -> int:
        """Apply every spooled record in order; truncate once all are applied. `apply`
        raising (the store went away again) leaves the spool as it is, for the next try.
        Holding the lock keeps new appends behind the replay, which preserves order."""
        with self._lock:
            records = self.records()
            for rec in records:
                apply(rec)
            if records or self._count:
                fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o600)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._count = 0
            return len(records)
