"""An append-only, fsynced spool of usage records for when the ledger store is away.

Each line is one JSON record, written and fsynced before the request's response is
considered billed. Replay applies lines in order through an idempotent store, and only
then truncates the file, so a crash mid-replay replays again without counting twice.

Checkpoints of running requests (crash-safe metering) are spooled too, as lines marked
"checkpoint", written without an fsync: a write to the file survives the process being
killed, and each one only backs up the next final record.
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
        self._count = sum(1 for _ in self._lines())                     # lines, checkpoints included
        self._finals = len(self.records())

    def __len__(self) -> int:
        """Final usage records waiting (what GetUsage reports as spooled)."""
        return self._finals

    @property
    def pending(self) -> int:
        """Lines waiting, checkpoints included: while any wait, new writes queue behind."""
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

    def append(self, rec: UsageRecord, checkpoint: bool = False) -> None:
        d = rec.to_dict()
        if checkpoint:
            d["checkpoint"] = True
        data = (json.dumps(d, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                if not checkpoint:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._count += 1
            self._finals += not checkpoint

    def entries(self) -> list[tuple[UsageRecord, bool]]:
        """(record, is a checkpoint) in spool order."""
        out = []
        for line in self._lines():
            try:
                d = json.loads(line)
                out.append((UsageRecord.from_dict(d), bool(d.get("checkpoint"))))
            except (ValueError, TypeError):
                continue
        return out

    def records(self) -> list[UsageRecord]:
        """The final records (no checkpoints)."""
        return [rec for rec, checkpoint in self.entries() if not checkpoint]

    def replay(self, apply: Callable[[UsageRecord], object],
               apply_checkpoint: Callable[[UsageRecord], object] | None = None) -> int:
        """Apply every spooled record in order; truncate once all are applied. `apply`
        raising (the store went away again) leaves the spool as it is, for the next try.
        Holding the lock keeps new appends behind the replay, which preserves order.
        Checkpoints go to `apply_checkpoint` (skipped without one); returns the count of
        final records applied."""
        with self._lock:
            entries = self.entries()
            records = [rec for rec, checkpoint in entries if not checkpoint]
            for rec, checkpoint in entries:
                if not checkpoint:
                    apply(rec)
                elif apply_checkpoint is not None:
                    apply_checkpoint(rec)
            if entries or self._count:
                fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o600)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._count = self._finals = 0
            return len(records)
