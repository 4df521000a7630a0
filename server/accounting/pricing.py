"""Prices per model, cached from the ledger store (set by Admin.SetPrice, shared by
replicas) and refreshed in the background, so costing a request never waits on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from server.accounting.ledger import LedgerStore, Price, StoreUnavailable

log = logging.getLogger("sol.pricing")


class PriceBook:
    def __init__(self, store: LedgerStore, run: Callable, default: Price, refresh_s: float = 5.0) -> None:
        self.store = store
        self._run = run
        self.default = default
        self.refresh_s = refresh_s
        self._prices: dict[str, Price] = {}
        self._task: asyncio.Task | None = None

    def get(self, model: str) -> Price:
        return self._prices.get(model, self.default)

    async def set(self, model: str, price: Price) -> None:
        await self._run(self.store.set_price, model, price)
        self._prices[model] = price

    async def refresh(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            prices = await self._run(self.store.prices)
            # A price the store holds but SetPrice would refuse (written by another replica
            # of an older version) is not used: a non-finite cost fails every response.
            self._prices = {model: p for model, p in prices.items() if p.is_valid()}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep the last prices on any store trouble
                log.exception("price refresh failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
