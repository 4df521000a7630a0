"""Accounting: writes each request's usage to the ledger store exactly once, spooling to
a local fsynced file while the store is unreachable and replaying it, in order and
idempotently, when the store returns. Serving never waits on a dead store.

It also runs this process's server instance for crash-safe metering: the instance id
that claims, reservations and checkpoints carry, its lease (renewed every third of
`lease_s`), and the reaping of dead instances' checkpoints into bills."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from server.accounting.ledger import LedgerStore, StoreUnavailable, UsageRecord
from server.accounting.spool import Spool

log = logging.getLogger("sol.accounting")


class Accountant:
    def __init__(self, store: LedgerStore, spool: Spool, run: Callable, replay_interval_s: float = 0.5,
                 slot: str = "", lease_s: float = 10.0) -> None:
        self.store = store
        self.spool = spool
        self._run = run
        self.replay_interval_s = replay_interval_s
        # One id per process: a restart is a new instance, and the one it replaces in its
        # slot (host and port, as the spool is named) is dead from its registration on.
        self.instance = uuid.uuid4().hex[:16]
        self.slot = slot or self.instance
        self.lease_s = lease_s
        self.registered = False
        self._attempts = itertools.count(1)
        store.instance = self.instance
        self._heartbeat_task: asyncio.Task | None = None
        # Request ids billed by this process, for idempotency checks while the store is away.
        self._recent: OrderedDict[tuple[str, str], UsageRecord] = OrderedDict()
        self._task: asyncio.Task | None = None
        self.store_up = True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._replay_loop())
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def new_attempt(self) -> str:
        """The id of a new run on this instance ("<instance>.<n>")."""
        return f"{self.instance}.{next(self._attempts)}"

    async def begin(self) -> None:
        """Register this instance, bill what the previous run of this slot left spooled or
        checkpointed, and free its claims and reservations. With the store away, the
        heartbeat loop does it once the store is back."""
        with contextlib.suppress(StoreUnavailable):
            await self._run(self.store.register_instance, self.instance, self.slot, self.lease_s, time.time())
            self.registered = True
            await self.replay_now()
            await self.reap()

    async def reap(self) -> int:
        n = await self._run(self.store.reap, time.time())
        if n:
            log.info("billed %d requests that a stopped server instance left running (from their checkpoints)", n)
        return n

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not self.registered:
                    await self.begin()
                    continue
                await self._run(self.store.heartbeat, self.instance, self.lease_s, time.time())
                await self.reap()
            except StoreUnavailable:
                continue
            except Exception:  # noqa: BLE001 - the loop must survive anything a store throws
                log.exception("instance heartbeat failed; will retry")

    async def checkpoint(self, rec: UsageRecord) -> None:
        """Write ahead a running attempt's usage so far: to the store, else the spool.
        Never raises for a store that is away."""
        await asyncio.shield(self._run(self._checkpoint_blocking, rec))

    def _checkpoint_blocking(self, rec: UsageRecord) -> None:
        if self.spool.pending == 0:
            try:
                self.store.checkpoint(rec)
                return
            except StoreUnavailable:
                self.store_up = False
        self.spool.append(rec, checkpoint=True)

    def _replay_checkpoint(self, rec: UsageRecord) -> None:
        """A spooled checkpoint: this instance's runs keep it as a checkpoint; an earlier
        instance's (this slot's run before a crash) is dead, so it is billed as cut."""
        if rec.instance == self.instance:
            self.store.checkpoint(rec)
        else:
            self.store.record(replace(rec, cut=True))

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
        if self.spool.pending == 0:
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
        """The billed record of a request: the store's (the total over its runs), else this
        process's memory (the store is away, or the record is still spooled)."""
        rec = self._recent.get((key_id, request_id))
        try:
            stored = await self._run(self.store.get_record, key_id, request_id)
        except StoreUnavailable:
            if rec is None:
                raise
            return rec
        return stored if stored is not None else rec

    async def replay_now(self) -> int:
        """Try to drain the spool once; returns records applied (0 if the store is away)."""
        if self.spool.pending == 0:
            return 0
        try:
            n = await self._run(self.spool.replay, self.store.record, self._replay_checkpoint)
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
        for task in (self._task, self._heartbeat_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.replay_now()
