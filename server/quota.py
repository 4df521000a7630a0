"""Admission against a key's quotas (requests/min, tokens/min, total token budget),
checked in the shared ledger store before a request reaches the engine, so every
replica sees the same counters. While the store is away, a per-process fallback keeps
the requests-per-minute limit and the last known budget, and serving goes on."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from server.ledger import Admission, KeyInfo, LedgerStore, StoreUnavailable, minute_window, refusal

log = logging.getLogger("sol.quota")


class QuotaGate:
    def __init__(self, store: LedgerStore, run: Callable) -> None:
        self.store = store
        self._run = run
        self._local: dict[tuple[str, int], int] = {}       # (key id, minute) -> requests
        self._local_tokens: dict[str, int] = {}            # tokens billed here while degraded

    @staticmethod
    def needs_store(key: KeyInfo) -> bool:
        return key.rpm is not None or key.tpm is not None or key.token_budget is not None

    async def admit(self, key: KeyInfo, request_id: str, estimate_tokens: int) -> Admission:
        if not self.needs_store(key):
            return Admission(True)
        now = time.time()
        try:
            return await self._run(self.store.admit, key, request_id, estimate_tokens, now)
        except StoreUnavailable:
            return self._admit_locally(key, estimate_tokens, now)

    def _admit_locally(self, key: KeyInfo, estimate: int, now: float) -> Admission:
        minute, _ = minute_window(now)
        for k in [k for k in self._local if k[1] < minute]:
            del self._local[k]
        requests = self._local.get((key.key_id, minute), 0)
        approx = KeyInfo(**{**key.__dict__, "tokens_used": key.tokens_used + self._local_tokens.get(key.key_id, 0)})
        refused = refusal(approx, requests, 0, 0, estimate, now)
        if refused:
            return refused
        self._local[(key.key_id, minute)] = requests + 1
        return Admission(True)

    def note_usage(self, key_id: str, tokens: int) -> None:
        self._local_tokens[key_id] = self._local_tokens.get(key_id, 0) + tokens

    async def release(self, key: KeyInfo, request_id: str) -> None:
        """Give back a reservation of a request that never ran (refused after admission)."""
        if key.token_budget is None:
            return
        # If the store is away the reservation lapses by itself after RESERVATION_TTL_S.
        with contextlib.suppress(StoreUnavailable):
            await self._run(self.store.release, key.key_id, request_id)
