"""The ledger's vocabulary: keys, prices, usage records and rows, and the store contract
that the Redis store (production, shared by replicas) and the SQLite store (embedded
default) both implement with the same semantics.

Semantics every store guarantees (tests/service/test_ledger.py runs them on both):
- `record` is atomic and idempotent by (key_id, request_id): a record applied twice
  (a retried write, a spool replay after a lost reply) counts once.
- `claim` makes a request id single-flight across replicas: a duplicate sent to another
  replica while the first runs is refused instead of being served free.
- `admit` checks requests-per-minute, tokens-per-minute and the total token budget
  and, when admitted, reserves the request's worst case (prompt + max_tokens x n)
  against the budget and in the key's rate window, and counts the request, in one
  atomic step, so concurrent requests on several replicas cannot overspend a budget
  or a rate limit.
- `record` settles the reservations to the actual usage (freeing the difference);
  `release` gives back the reservations and the request count of a request that
  never ran.

Rate limits use a sliding window of RATE_WINDOW_S: a request counts, with its tokens,
from its admission until RATE_WINDOW_S later. Its tokens are its reservation while it
runs and its actual usage once recorded. A refusal's retry-after is the moment enough
of the window's entries leave it for the request to fit (earlier if running requests
settle below their reservations).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

# How long a request id is remembered for idempotency, and how long an unsettled
# reservation (a replica that died mid-request) holds budget before it lapses.
IDEMPOTENCY_TTL_S = 7 * 24 * 3600
RESERVATION_TTL_S = 15 * 60
# The rate limits' sliding window: rpm and tpm count what was admitted in the last minute.
RATE_WINDOW_S = 60.0


class StoreUnavailable(RuntimeError):
    """The ledger store cannot be reached (Redis down); callers spool or degrade."""


def utc_day(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.UTC).strftime("%Y-%m-%d")


# The most a price may be, per 1K tokens: far above any real price, and small enough that
# a cost (at most ~1e6 tokens a request) and a ledger's sum of them stay finite floats.
MAX_PRICE_PER_1K = 1e6


@dataclass(frozen=True)
class Price:
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    cached_discount: float = 0.5     # fraction off the prompt price for cached prompt tokens

    def validate(self) -> None:
        # NaN fails every comparison, so each range is written as what must hold.
        for name in ("prompt_per_1k", "completion_per_1k"):
            value = getattr(self, name)
            if not 0.0 <= value <= MAX_PRICE_PER_1K:
                raise ValueError(f"{name} must be a number in [0, {MAX_PRICE_PER_1K:g}] per 1K tokens (got {value})")
        if not 0.0 <= self.cached_discount <= 1.0:
            raise ValueError(f"cached_discount must be in [0, 1] (got {self.cached_discount})")

    def is_valid(self) -> bool:
        try:
            self.validate()
        except ValueError:
            return False
        return True

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
    # Scheduling (fair share): the key's weight against other keys when the server is busy
    # (2 = twice the tokens of a weight-1 key), and its band: "interactive" keys are served
    # before "batch" keys (KEY_BANDS).
    share: float = 1.0
    band: str = "interactive"


KEY_BANDS = ("interactive", "batch")
MAX_SHARE = 1000.0


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
    retry_after_s: float = 0.0       # 0 = retrying will not help (budget spent, request too large)
    limit: str = ""                  # which limit refused: "rpm", "tpm" or "budget"
    room: int = 0                    # tokens that limit has for a request now ("tpm", "budget")


@dataclass(frozen=True)
class WindowState:
    """A key's sliding rate-limit window at an admission: what it holds, and how long
    until the request would fit (0 when it fits now)."""

    requests: int = 0                # requests admitted in the last RATE_WINDOW_S
    tokens: int = 0                  # their tokens: reservations while running, then usage
    request_wait_s: float = 0.0      # until a request slot frees
    token_wait_s: float = 0.0        # until enough tokens leave the window for the request


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
    def update_key(self, key_id: str, share: float | None = None, band: str | None = None) -> KeyInfo | None:
        """Change a key's scheduling settings (None = unchanged); the updated key, or None
        when no such key exists."""
        ...

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


def window_state(entries: Sequence[tuple[float, int]], key: KeyInfo, estimate: int, now: float) -> WindowState:
    """The window of `entries` ((admitted at, tokens), oldest first, all still inside it)
    and the truthful waits: a slot frees when the oldest request past the rpm leaves;
    room for `estimate` comes when the oldest entries holding the excess tokens leave."""
    requests = len(entries)
    tokens = sum(t for _, t in entries)
    request_wait = token_wait = 0.0
    if key.rpm is not None and requests >= key.rpm:
        request_wait = entries[requests - key.rpm][0] + RATE_WINDOW_S - now
    if key.tpm is not None and estimate <= key.tpm < tokens + estimate:
        excess = tokens + estimate - key.tpm
        token_wait = RATE_WINDOW_S
        for ts, t in entries:
            excess -= t
            if excess <= 0:
                token_wait = ts + RATE_WINDOW_S - now
                break
    return WindowState(requests, tokens, request_wait, token_wait)


def _wait(seconds: float) -> float:
    """A wait as a retry-after: rounded up to the millisecond (the wire's unit), never 0
    (that would mean 'retrying will not help'), and never past the window: concurrent
    admissions take `now` before they queue for the store, so an entry may be stamped a
    moment after the `now` of a request checked later."""
    return min(RATE_WINDOW_S, max(0.001, math.ceil(seconds * 1000) / 1000))


def refusal(key: KeyInfo, window: WindowState, reserved: int, estimate: int) -> Admission | None:
    """The shared admission rule, so both stores refuse with the same words (the Redis
    store's Lua script applies the same rule). Returns None when the request may go ahead."""
    if key.rpm is not None and window.requests >= key.rpm:
        wait = _wait(window.request_wait_s)
        return Admission(False, f"rate limit: {key.rpm} requests per minute for key {key.key_id} reached "
                                f"(a sliding minute); retry in {math.ceil(wait)} s or ask for a higher rpm",
                         wait, "rpm")
    if key.tpm is not None and estimate > key.tpm:
        return Admission(False, f"rate limit: this request may need {estimate} tokens (prompt + max_tokens x n) "
                                f"but key {key.key_id} allows {key.tpm} tokens per minute; lower max_tokens "
                                "or ask for a higher tpm", 0.0, "tpm", key.tpm)
    if key.tpm is not None and window.tokens + estimate > key.tpm:
        wait = _wait(window.token_wait_s)
        free = max(0, key.tpm - window.tokens)
        return Admission(False, f"rate limit: {key.tpm} tokens per minute for key {key.key_id}: {window.tokens} "
                                f"taken in the last minute (running requests hold their max_tokens until they "
                                f"finish), this request may need {estimate}; retry in {math.ceil(wait)} s, lower "
                                "max_tokens, or ask for a higher tpm", wait, "tpm", free)
    if key.token_budget is not None and key.tokens_used + reserved + estimate > key.token_budget:
        left = max(0, key.token_budget - key.tokens_used - reserved)
        if reserved and key.tokens_used + estimate <= key.token_budget:
            # Spent by requests still running: room may come back when they finish.
            return Admission(False, f"token budget of key {key.key_id}: {left} tokens left while "
                                    f"other requests run, this one may need {estimate}; retry shortly "
                                    "or lower max_tokens", 1.0, "budget", left)
        if left == 0:
            return Admission(False, f"token budget of key {key.key_id} spent: 0 of {key.token_budget} tokens "
                                    "left; ask for a larger budget", 0.0, "budget", 0)
        return Admission(False, f"token budget of key {key.key_id}: {left} of {key.token_budget} tokens left, "
                                f"this request may need {estimate} (prompt + max_tokens x n); lower max_tokens "
                                "or ask for a larger budget", 0.0, "budget", left)
    return None


def with_assumed_max_tokens(refused: Admission, key: KeyInfo, estimate: int, max_tokens: int, n: int) -> Admission:
    """A token refusal reworded for a request that did not set max_tokens: the server
    assumed its default, and that assumption, not anything the caller sent or spent, is
    what does not fit; say so and how small a max_tokens would."""
    if refused.admitted or refused.limit not in ("tpm", "budget"):
        return refused
    prompt = estimate - max_tokens * n
    times_n = f" x n={n}" if n > 1 else ""
    if refused.limit == "budget":
        where = f"the {refused.room} of {key.token_budget} tokens left in the token budget of key {key.key_id}"
    elif refused.retry_after_s == 0:
        where = f"the {key.tpm} tokens per minute key {key.key_id} allows"
    else:
        where = f"the {refused.room} of key {key.key_id}'s {key.tpm} tokens per minute free now"
    fits = (refused.room - prompt) // n
    fix = (f"send max_tokens of at most {fits}" if fits >= 1 else
           f"the {prompt}-token prompt alone does not fit: shorten it")
    if refused.retry_after_s:
        fix += f", or retry in {math.ceil(refused.retry_after_s)} s"
    reason = (f"this request did not set max_tokens, so the server assumed its default max_tokens of "
              f"{max_tokens}{times_n}; with the {prompt}-token prompt it may need {estimate} tokens, more than "
              f"{where}: {fix}")
    return Admission(False, reason, refused.retry_after_s, refused.limit, refused.room)
