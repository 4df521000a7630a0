"""Accounting: writes each request's usage to the ledger store exactly once, spooling to
a local fsynced file while the store is unreachable and replaying it, in order and
idempotently, when the store returns. Serving never waits on a dead store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from server.accounting.ledger import LedgerStore, StoreUnavailable, UsageRecord
from server.accounting.spool import Spool

log = logging.getLogger("sol.accounting")


class Accountant:
    def __init__(self, store: LedgerStore, spool: Spool, run: Callable, replay_interval_s: float = 0.5) -> None:
        self.store = store
        self.spool = spool
        self._run = run
        self.replay_interval_s = replay_interval_s
        # Request ids billed by this process, for idempotency checks while the store is away.
        self._recent: OrderedDict[tuple[str, str], UsageRecord] = OrderedDict()
        self._task: asyncio.Task | None = None
        self.store_up = True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._replay_loop())

    def _remember(self, rec: UsageRecord) -> None:
        self._recent[(rec.key_id, rec.request_id)] = rec
        while len(self._recent) > 200_000:
            self._recent.popitem(last=False)

    async def record(self, rec: UsageRecord) -> None:
        """Never raises: the record reaches the store or the spool."""
        self._remember(rec)
        # Shielded: a caller cancelled mid-await (its client hung up as the bill was being
        # written) must not cancel a write still queued in the executor; the bill is
        # already marked as made, so nothing would write it again.
        await asyncio.shield(self._run(self._record_blocking, rec))

    def _record_blocking(self, rec: UsageRecord) -> None:
        # While anything is spooled, new records queue behind it, so replay keeps order.
        if len(self.spool) == 0:
            try:
                self.store.record(rec)
                self.store_up = True
                return
            except StoreUnavailable as err:
                if self.store_up:
                    log.warning("ledger store unreachable, spooling usage to %s: %s", self.spool.path, err)
                self.store_up = False
        self.spool.append(rec)

    async def claim(self, key_id: str, request_id: str) -> str:
        """"ok", "running" (on another replica) or "billed". With the store away, only
        this process's memory answers (the caller also checks its own running requests)."""
        if (key_id, request_id) in self._recent:
            return "billed"
        try:
            return await self._run(self.store.claim, key_id, request_id, time.time())
        except StoreUnavailable:
            return "ok"

    async def unclaim(self, key_id: str, request_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._run(self.store.unclaim, key_id, request_id)

    async def lookup(self, key_id: str, request_id: str) -> UsageRecord | None:
        """The billed record of a request: this process's memory first (it may still be
        spooled), then the store."""
        rec = self._recent.get((key_id, request_id))
        if rec is not None:
            return rec
        return await self._run(self.store.get_record, key_id, request_id)

    async def replay_now(self) -> int:
        """Try to drain the spool once; returns records applied (0 if the store is away)."""
        if len(self.spool) == 0:
            return 0
        try:
            n = await self._run(self.spool.replay, self.store.record)
        except StoreUnavailable:
            return 0
        if n:
            log.info("ledger store back: replayed %d spooled usage records", n)
        self.store_up = True
        return n

    async def _replay_loop(self) -> None:
        while True:
            await asyncio.sleep(self.replay_interval_s)
            try:
                await self.replay_now()
            except Exception:  # noqa: BLE001 - the loop must survive anything a store throws
                log.exception("spool replay failed; will retry")

    async def close(self) -> None:
        """Stop replaying; one last attempt to drain. What stays spooled is replayed by
        the next start (the spool is a file)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.replay_now()
