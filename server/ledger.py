"""The ledger's vocabulary: keys, prices, usage records and rows, and the store contract
that the Redis store (production, shared by replicas) and the SQLite store (embedded
default) both implement with the same semantics.

Semantics every store guarantees (tests/service/test_ledger.py runs them on both):
- `record` is atomic and idempotent by (key_id, request_id): a record applied twice
  (a retried write, a spool replay after a lost reply) counts once.
- `claim` makes a request id single-flight across replicas: a duplicate sent to another
  replica while the first runs is refused instead of being served free.
- `admit` checks requests-per-minute, tokens-per-minute and the total token budget
  and, when admitted, reserves the request's worst case against the budget, in one
  atomic step, so concurrent requests on several replicas cannot overspend a budget.
  `record` (or `release`) settles the reservation.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Protocol

# How long a request id is remembered for idempotency, and how long an unsettled
# reservation (a replica that died mid-request) holds budget before it lapses.
IDEMPOTENCY_TTL_S = 7 * 24 * 3600
RESERVATION_TTL_S = 15 * 60


class StoreUnavailable(RuntimeError):
    """The ledger store cannot be reached (Redis down); callers spool or degrade."""


def utc_day(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Price:
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    cached_discount: float = 0.5     # fraction off the prompt price for cached prompt tokens

    def validate(self) -> None:
        if self.prompt_per_1k < 0 or self.completion_per_1k < 0:
            raise ValueError("prices must be >= 0")
        if not 0.0 <= self.cached_discount <= 1.0:
            raise ValueError(f"cached_discount must be in [0, 1] (got {self.cached_discount})")

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> float:
        uncached = prompt_tokens - cached_tokens
        return (uncached * self.prompt_per_1k
                + cached_tokens * self.prompt_per_1k * (1.0 - self.cached_discount)
                + completion_tokens * self.completion_per_1k) / 1000.0


@dataclass
class KeyInfo:
    key_id: str
    name: str
    prefix: str
    created: int
    revoked: bool = False
    token_budget: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    tokens_used: int = 0


@dataclass(frozen=True)
class UsageRecord:
    """One finished (or aborted) request's billable usage."""

    key_id: str
    request_id: str
    model: str
    version: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: float
    day: str
    ts: float = field(default_factory=time.time)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {"key_id": self.key_id, "request_id": self.request_id, "model": self.model,
                "version": self.version, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
                "cost": self.cost, "day": self.day, "ts": self.ts}

    @classmethod
    def from_dict(cls, d: dict) -> UsageRecord:
        return cls(**d)


@dataclass
class UsageRow:
    key_id: str = ""
    model: str = ""
    day: str = ""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: UsageRow) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cost += other.cost


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str = ""                 # what ran out and what to do, when refused
    retry_after_s: float = 0.0       # 0 = retrying will not help (budget spent)


class LedgerStore(Protocol):
    """Blocking calls; the service runs them on a worker thread."""

    def ping(self) -> None: ...
    def claim_fingerprint(self, value: str) -> str:
        """Store `value` as the ledger's key-pepper fingerprint unless one is stored;
        return the stored one (so replicas with different peppers are caught)."""
        ...

    # keys
    def create_key(self, key: KeyInfo, key_hash: str) -> None: ...
    def key_by_hash(self, key_hash: str) -> KeyInfo | None: ...
    def get_key(self, key_id: str) -> KeyInfo | None: ...
    def revoke_key(self, key_id: str) -> bool: ...
    def list_keys(self, include_revoked: bool = False) -> list[KeyInfo]: ...

    # prices
    def set_price(self, model: str, price: Price) -> None: ...
    def prices(self) -> dict[str, Price]: ...

    # quotas
    def admit(self, key: KeyInfo, request_id: str, estimate_tokens: int, now: float) -> Admission: ...
    def release(self, key_id: str, request_id: str) -> None: ...

    # usage
    def record(self, rec: UsageRecord) -> bool: ...
    def has_record(self, key_id: str, request_id: str) -> bool: ...
    def claim(self, key_id: str, request_id: str, now: float) -> str:
        """Atomically claim a request id for a run, across replicas: "ok", "running"
        (another replica runs it) or "billed". `record` or `unclaim` ends the claim;
        a claim left by a dead replica lapses after RESERVATION_TTL_S."""
        ...
    def unclaim(self, key_id: str, request_id: str) -> None: ...
    def get_record(self, key_id: str, request_id: str) -> UsageRecord | None: ...
    def usage(self, key_id: str = "", model: str = "", from_day: str = "", to_day: str = "") -> list[UsageRow]: ...

    def close(self) -> None: ...


def minute_window(now: float) -> tuple[int, float]:
    """The fixed one-minute rate-limit window holding `now`, and seconds until it ends."""
    minute = int(now // 60)
    return minute, (minute + 1) * 60 - now


def refusal(key: KeyInfo, rpm_used: int, tpm_used: int, reserved: int, estimate: int,
            now: float) -> Admission | None:
    """The shared admission rule, so both stores refuse with the same words. Returns None
    when the request may go ahead."""
    _, wait = minute_window(now)
    if key.rpm is not None and rpm_used >= key.rpm:
        return Admission(False, f"rate limit: {key.rpm} requests per minute for key {key.key_id} "
                                f"reached; retry in {wait:.0f} s or ask for a higher rpm", wait)
    if key.tpm is not None and tpm_used >= key.tpm:
        return Admission(False, f"rate limit: {key.tpm} tokens per minute for key {key.key_id} "
                                f"reached; retry in {wait:.0f} s or ask for a higher tpm", wait)
    if key.token_budget is not None and key.tokens_used + reserved + estimate > key.token_budget:
        left = max(0, key.token_budget - key.tokens_used - reserved)
        if reserved and key.tokens_used + estimate <= key.token_budget:
            # Spent by requests still running: room may come back when they finish.
            return Admission(False, f"token budget of key {key.key_id}: {left} tokens left while "
                                    f"other requests run, this one may need {estimate}; retry shortly "
                                    "or lower max_tokens", 1.0)
        return Admission(False, f"token budget of key {key.key_id} spent: {left} of {key.token_budget} "
                                f"tokens left, this request may need {estimate} (prompt + max_tokens x n); "
                                "lower max_tokens or ask for a larger budget", 0.0)
    return None
