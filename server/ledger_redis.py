"""The production ledger store: Redis, shared by every replica. Each multi-key update
is one Lua script, so it is atomic, and usage records are idempotent by request id.

Run Redis with AOF persistence (`appendonly yes`, `appendfsync everysec` or `always`):
the ledger is billing data. Key layout (prefix `sol:`):

    key:{id}              hash  name, prefix, created, revoked, token_budget, rpm, tpm, tokens_used
    keyhash:{hmac}        str   -> key id (keys are stored hashed, never in clear)
    keys                  set   key ids
    pepper-fingerprint    str   HMAC(pepper, constant): replicas must share one pepper
    prices                hash  model -> "prompt_per_1k completion_per_1k cached_discount"
    req:{id}:{request}    str   the request's usage record (JSON): idempotency marker, expires
                                after IDEMPOTENCY_TTL_S
    usage:{day}:{id}:{m}  hash  requests, prompt_tokens, completion_tokens, cached_tokens, cost
    usage-index           set   "day|key id|model" of every usage hash
    win:{id}:{minute}     hash  requests, tokens in that minute (rate limits)
    resv:{id}             hash  request id -> "tokens expires" (budget reservations)
    run:{id}:{request}    str   a replica runs this request id (single-flight), until recorded
"""

from __future__ import annotations

import json
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.ledger import (
    IDEMPOTENCY_TTL_S,
    RESERVATION_TTL_S,
    Admission,
    KeyInfo,
    Price,
    StoreUnavailable,
    UsageRecord,
    UsageRow,
    minute_window,
    refusal,
)

P = "sol:"
MAX_COOLDOWN_S = 4.0

RECORD_LUA = """
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('DEL', KEYS[7])
if not redis.call('SET', KEYS[1], ARGV[9], 'NX', 'EX', tonumber(ARGV[2])) then return 0 end
redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'cached_tokens', ARGV[5])
redis.call('HINCRBYFLOAT', KEYS[2], 'cost', ARGV[6])
redis.call('SADD', KEYS[6], ARGV[7])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HINCRBY', KEYS[3], 'tokens_used', ARGV[8]) end
redis.call('HINCRBY', KEYS[4], 'tokens', ARGV[8])
redis.call('EXPIRE', KEYS[4], 180)
return 1
"""

CLAIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'billed' end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 'ok' end
return 'running'
"""

# Returns {admitted, requests this minute, tokens this minute, reserved, tokens used}.
# The rule matches server.ledger.refusal, which words the refusal.
ADMIT_LUA = """
local now = tonumber(ARGV[3])
local reserved = 0
local resv = redis.call('HGETALL', KEYS[3])
for i = 1, #resv, 2 do
  local tokens, expires = string.match(resv[i + 1], '(%d+) ([%d.]+)')
  if tonumber(expires) < now then redis.call('HDEL', KEYS[3], resv[i])
  else reserved = reserved + tonumber(tokens) end
end
local used = tonumber(redis.call('HGET', KEYS[1], 'tokens_used') or '0')
local rq = tonumber(redis.call('HGET', KEYS[2], 'requests') or '0')
local tk = tonumber(redis.call('HGET', KEYS[2], 'tokens') or '0')
local estimate = tonumber(ARGV[2])
local rpm, tpm, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if (rpm >= 0 and rq >= rpm) or (tpm >= 0 and tk >= tpm) or (budget >= 0 and used + reserved + estimate > budget) then
  return {0, rq, tk, reserved, used}
end
redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('EXPIRE', KEYS[2], 180)
if budget >= 0 then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. tostring(now + tonumber(ARGV[7])))
end
return {1, rq, tk, reserved, used}
"""


def _opt(v: str | bytes | None) -> int | None:
    return None if v in (None, "", b"") else int(v)


def _key(h: dict) -> KeyInfo:
    return KeyInfo(key_id=h["key_id"], name=h["name"], prefix=h["prefix"], created=int(h["created"]),
                   revoked=h.get("revoked") == "1", token_budget=_opt(h.get("token_budget")),
                   rpm=_opt(h.get("rpm")), tpm=_opt(h.get("tpm")), tokens_used=int(h.get("tokens_used") or 0))


def _unavailable(fn):
    """Map Redis connection trouble to StoreUnavailable, with a circuit breaker: after a
    failure, calls fail at once for a cooldown (doubling per failure, up to
    MAX_COOLDOWN_S) instead of each waiting out a socket timeout, which a partitioned
    Redis would otherwise add to every request."""
    def wrapper(self, *args, **kwargs):
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("redis unreachable (recent failure; retrying shortly)")
        try:
            result = fn(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
            self._failures += 1
            cooldown = min(MAX_COOLDOWN_S, self.cooldown_s * 2 ** (self._failures - 1))
            self._down_until = time.monotonic() + cooldown
            raise StoreUnavailable(f"redis unreachable: {err}") from err
        self._failures = 0
        return result
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class RedisStore:
    def __init__(self, url: str, timeout_s: float = 1.0, cooldown_s: float = 0.5) -> None:
        self.url = url
        self.cooldown_s = cooldown_s
        self._down_until = 0.0
        self._failures = 0
        # Short timeouts and no hidden retries: when Redis is away the service must know
        # at once, so it spools and keeps serving instead of stalling requests.
        self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                                       health_check_interval=0)
        self._record = self._r.register_script(RECORD_LUA)
        self._admit = self._r.register_script(ADMIT_LUA)
        self._claim = self._r.register_script(CLAIM_LUA)

    @_unavailable
    def ping(self) -> None:
        self._r.ping()

    @_unavailable
    def claim_fingerprint(self, value: str) -> str:
        self._r.set(f"{P}pepper-fingerprint", value, nx=True)
        return self._r.get(f"{P}pepper-fingerprint")

    # --- keys -------------------------------------------------------------------------------
    @_unavailable
    def create_key(self, key: KeyInfo, key_hash: str) -> None:
        fields = {"key_id": key.key_id, "name": key.name, "prefix": key.prefix, "created": key.created,
                  "revoked": "1" if key.revoked else "0", "tokens_used": key.tokens_used,
                  "token_budget": "" if key.token_budget is None else key.token_budget,
                  "rpm": "" if key.rpm is None else key.rpm, "tpm": "" if key.tpm is None else key.tpm,
                  "hash": key_hash}
        with self._r.pipeline(transaction=True) as p:
            p.hset(f"{P}key:{key.key_id}", mapping=fields)
            p.set(f"{P}keyhash:{key_hash}", key.key_id)
            p.sadd(f"{P}keys", key.key_id)
            p.execute()

    @_unavailable
    def key_by_hash(self, key_hash: str) -> KeyInfo | None:
        key_id = self._r.get(f"{P}keyhash:{key_hash}")
        return self.get_key(key_id) if key_id else None

    @_unavailable
    def get_key(self, key_id: str) -> KeyInfo | None:
        h = self._r.hgetall(f"{P}key:{key_id}")
        return _key(h) if h.get("key_id") else None

    @_unavailable
    def revoke_key(self, key_id: str) -> bool:
        name = f"{P}key:{key_id}"
        with self._r.pipeline(transaction=True) as p:
            p.hget(name, "revoked")
            p.hget(name, "key_id")
            was, exists = p.execute()
        if not exists or was == "1":
            return False
        self._r.hset(name, "revoked", "1")
        return True

    @_unavailable
    def list_keys(self, include_revoked: bool = False) -> list[KeyInfo]:
        ids = sorted(self._r.smembers(f"{P}keys"))
        with self._r.pipeline(transaction=False) as p:
            for key_id in ids:
                p.hgetall(f"{P}key:{key_id}")
            keys = [_key(h) for h in p.execute() if h.get("key_id")]
        keys = [k for k in keys if include_revoked or not k.revoked]
        return sorted(keys, key=lambda k: (k.created, k.key_id))

    # --- prices -----------------------------------------------------------------------------
    @_unavailable
    def set_price(self, model: str, price: Price) -> None:
        self._r.hset(f"{P}prices", model,
                     f"{price.prompt_per_1k!r} {price.completion_per_1k!r} {price.cached_discount!r}")

    @_unavailable
    def prices(self) -> dict[str, Price]:
        out = {}
        for model, value in self._r.hgetall(f"{P}prices").items():
            a, b, c = (float(x) for x in value.split())
            out[model] = Price(a, b, c)
        return out

    # --- quotas -----------------------------------------------------------------------------
    @_unavailable
    def admit(self, key: KeyInfo, request_id: str, estimate_tokens: int, now: float) -> Admission:
        minute, _ = minute_window(now)
        keys = [f"{P}key:{key.key_id}", f"{P}win:{key.key_id}:{minute}", f"{P}resv:{key.key_id}"]
        args = [request_id, estimate_tokens, repr(now), -1 if key.rpm is None else key.rpm,
                -1 if key.tpm is None else key.tpm, -1 if key.token_budget is None else key.token_budget,
                RESERVATION_TTL_S]
        ok, rq, tk, reserved, used = (int(x) for x in self._admit(keys=keys, args=args))
        if ok:
            return Admission(True)
        fresh = KeyInfo(**{**key.__dict__, "tokens_used": used})
        return refusal(fresh, rq, tk, reserved, estimate_tokens, now) or Admission(
            False, f"quota of key {key.key_id} reached; retry shortly", 1.0)

    @_unavailable
    def release(self, key_id: str, request_id: str) -> None:
        self._r.hdel(f"{P}resv:{key_id}", request_id)

    # --- usage ------------------------------------------------------------------------------
    @_unavailable
    def record(self, rec: UsageRecord) -> bool:
        minute, _ = minute_window(rec.ts)
        keys = [f"{P}req:{rec.key_id}:{rec.request_id}", f"{P}usage:{rec.day}:{rec.key_id}:{rec.model}",
                f"{P}key:{rec.key_id}", f"{P}win:{rec.key_id}:{minute}", f"{P}resv:{rec.key_id}",
                f"{P}usage-index", f"{P}run:{rec.key_id}:{rec.request_id}"]
        args = [rec.request_id, IDEMPOTENCY_TTL_S, rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens,
                repr(float(rec.cost)), f"{rec.day}|{rec.key_id}|{rec.model}", rec.total_tokens,
                json.dumps(rec.to_dict())]
        return bool(self._record(keys=keys, args=args))

    @_unavailable
    def claim(self, key_id: str, request_id: str, now: float) -> str:
        return self._claim(keys=[f"{P}req:{key_id}:{request_id}", f"{P}run:{key_id}:{request_id}"],
                           args=[RESERVATION_TTL_S])

    @_unavailable
    def unclaim(self, key_id: str, request_id: str) -> None:
        self._r.delete(f"{P}run:{key_id}:{request_id}")

    @_unavailable
    def has_record(self, key_id: str, request_id: str) -> bool:
        return bool(self._r.exists(f"{P}req:{key_id}:{request_id}"))

    @_unavailable
    def get_record(self, key_id: str, request_id: str) -> UsageRecord | None:
        value = self._r.get(f"{P}req:{key_id}:{request_id}")
        return UsageRecord.from_dict(json.loads(value)) if value else None

    @_unavailable
    def usage(self, key_id: str = "", model: str = "", from_day: str = "", to_day: str = "") -> list[UsageRow]:
        wanted = []
        for member in self._r.smembers(f"{P}usage-index"):
            day, k, m = member.split("|", 2)
            if (key_id and k != key_id) or (model and m != model) or (from_day and day < from_day) or (
                    to_day and day > to_day):
                continue
            wanted.append((day, k, m))
        wanted.sort()
        with self._r.pipeline(transaction=False) as p:
            for day, k, m in wanted:
                p.hgetall(f"{P}usage:{day}:{k}:{m}")
            hashes = p.execute()
        return [UsageRow(key_id=k, model=m, day=day, requests=int(h.get("requests", 0)),
                         prompt_tokens=int(h.get("prompt_tokens", 0)),
                         completion_tokens=int(h.get("completion_tokens", 0)),
                         cached_tokens=int(h.get("cached_tokens", 0)), cost=float(h.get("cost", 0.0)))
                for (day, k, m), h in zip(wanted, hashes, strict=True)]

    def close(self) -> None:
        self._r.close()
