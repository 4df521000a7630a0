"""Admission against a key's quotas (requests/min, tokens/min, total token budget),
checked in the shared ledger store before a request reaches the engine, so every
replica sees the same counters. Tokens are reserved at admission (prompt + max_tokens
x n) and settled to the actual usage when the request is recorded (or given back by
`release` when it never ran), so concurrent requests cannot overshoot a limit.

While the store is away, a per-process fallback keeps the rate limits (a sliding
window of what this process admitted, which it also keeps while the store is up, so
an outage does not start from an empty window) and the last known budget, and
serving goes on. Each replica then enforces the limits alone: R replicas may admit up
to R times a limit until the store is back."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from server.accounting.ledger import (
    RATE_WINDOW_S,
    Admission,
    KeyInfo,
    LedgerStore,
    StoreUnavailable,
    refusal,
    window_state,
    with_assumed_max_tokens,
)

log = logging.getLogger("sol.quota")


class LocalWindow:
    """This process's sliding rate windows: key id -> request id -> [admitted at, tokens].
    Dicts keep insertion order, which is admission order, so the oldest come first."""

    def __init__(self) -> None:
        self._keys: dict[str, dict[str, list]] = {}
        self._swept = 0.0

    def entries(self, key_id: str, now: float) -> list[tuple[float, int]]:
        self._expire(now)
        cutoff = now - RATE_WINDOW_S
        return [(ts, tokens) for ts, tokens in self._keys.get(key_id, {}).values() if ts > cutoff]

    def add(self, key_id: str, request_id: str, tokens: int, now: float) -> None:
        window = self._keys.setdefault(key_id, {})
        window.pop(request_id, None)
        window[request_id] = [now, tokens]

    def settle(self, key_id: str, request_id: str, tokens: int) -> None:
        entry = self._keys.get(key_id, {}).get(request_id)
        if entry is not None:
            entry[1] = tokens

    def remove(self, key_id: str, request_id: str) -> None:
        self._keys.get(key_id, {}).pop(request_id, None)

    def _expire(self, now: float) -> None:
        # At most once a second: a sweep touches every key this process has seen.
        if now - self._swept < 1.0:
            return
        self._swept = now
        cutoff = now - RATE_WINDOW_S
        for key_id in list(self._keys):
            window = self._keys[key_id]
            while window and next(iter(window.values()))[0] <= cutoff:
                del window[next(iter(window))]
            if not window:
                del self._keys[key_id]


class QuotaGate:
    def __init__(self, store: LedgerStore, run: Callable) -> None:
        self.store = store
        self._run = run
        self._window = LocalWindow()
        # Tokens used through this process since its last admission through the store, per
        # key: what the cached key's tokens_used does not know yet while the store is away.
        self._local_tokens: dict[str, int] = {}

    @staticmethod
    def needs_store(key: KeyInfo) -> bool:
        return key.rpm is not None or key.tpm is not None or key.token_budget is not None

    @staticmethod
    def _rate_limited(key: KeyInfo) -> bool:
        return key.rpm is not None or key.tpm is not None

    async def admit(self, key: KeyInfo, request_id: str, estimate_tokens: int, *, max_tokens: int = 0,
                    n: int = 1, max_tokens_given: bool = True) -> Admission:
        """Admit and reserve `estimate_tokens` (prompt + max_tokens x n). With
        `max_tokens_given` False the server chose max_tokens, and a refusal says so."""
        if not self.needs_store(key):
            return Admission(True)
        now = time.time()
        try:
            admission = await self._run(self.store.admit, key, request_id, estimate_tokens, now)
        except StoreUnavailable:
            admission = self._admit_locally(key, request_id, estimate_tokens, now)
        else:
            self._local_tokens.pop(key.key_id, None)
            if admission.admitted and self._rate_limited(key):
                self._window.add(key.key_id, request_id, estimate_tokens, now)
        if not admission.admitted and not max_tokens_given and max_tokens:
            admission = with_assumed_max_tokens(admission, key, estimate_tokens, max_tokens, n)
        return admission

    def _admit_locally(self, key: KeyInfo, request_id: str, estimate: int, now: float) -> Admission:
        approx = KeyInfo(**{**key.__dict__, "tokens_used": key.tokens_used + self._local_tokens.get(key.key_id, 0)})
        window = window_state(self._window.entries(key.key_id, now), key, estimate, now)
        refused = refusal(approx, window, 0, estimate)
        if refused:
            return refused
        if self._rate_limited(key):
            self._window.add(key.key_id, request_id, estimate, now)
        return Admission(True)

    def note_usage(self, key_id: str, tokens: int, request_id: str = "") -> None:
        """A request's actual usage: settles this process's window entry (when the
        request id is given) and counts toward the fallback's budget."""
        self._local_tokens[key_id] = self._local_tokens.get(key_id, 0) + tokens
        if request_id:
            self._window.settle(key_id, request_id, tokens)

    async def release(self, key: KeyInfo, request_id: str) -> None:
        """Give back the reservations (budget, rate window) of a request that never ran
        (refused after admission, or its caller left mid-admission)."""
        if not self.needs_store(key):
            return
        self._window.remove(key.key_id, request_id)
        # If the store is away the reservation lapses by itself: budget reservations after
        # RESERVATION_TTL_S, window entries after RATE_WINDOW_S.
        with contextlib.suppress(StoreUnavailable):
            await self._run(self.store.release, key.key_id, request_id)
