"""The production ledger store: Redis, shared by every replica. Each multi-key update
is one Lua script, so it is atomic, and usage records are idempotent by request id.

Run Redis with AOF persistence (`appendonly yes`, `appendfsync everysec` or `always`):
the ledger is billing data. Key layout (prefix `sol:`):

    key:{id}              hash  name, prefix, created, revoked, token_budget, rpm, tpm, tokens_used,
                                share, band (absent in keys of earlier versions: 1, interactive)
    keyhash:{hmac}        str   -> key id (keys are stored hashed, never in clear)
    keys                  set   key ids
    pepper-fingerprint    str   HMAC(pepper, constant): replicas must share one pepper
    prices                hash  model -> "prompt_per_1k completion_per_1k cached_discount"
    req:{id}:{request}    str   the request's usage record (JSON): idempotency marker, expires
                                after IDEMPOTENCY_TTL_S
    usage:{day}:{id}:{m}  hash  requests, prompt_tokens, completion_tokens, cached_tokens, cost
    usage-index           set   "day|key id|model" of every usage hash
    rl:{id}               zset  request id -> admission time: the sliding rate window
    rlt:{id}              hash  request id -> its tokens in the window (reservation, then usage),
                                and "#tokens", their total (request ids cannot hold a '#')
    resv:{id}             hash  request id -> "tokens expires" (budget reservations)
    run:{id}:{request}    str   a replica runs this request id (single-flight), until recorded
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.accounting.ledger import (
    IDEMPOTENCY_TTL_S,
    RATE_WINDOW_S,
    RESERVATION_TTL_S,
    Admission,
    KeyInfo,
    Price,
    StoreUnavailable,
    UsageRecord,
    UsageRow,
    WindowState,
    refusal,
)
from server.accounting.ledger_repair import repair_redis

log = logging.getLogger("sol.ledger")

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
-- Settle the rate window: the reservation becomes the actual usage, freeing the rest.
local held = redis.call('HGET', KEYS[4], ARGV[1])
if held then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[8])
  redis.call('HINCRBY', KEYS[4], '#tokens', tonumber(ARGV[8]) - tonumber(held))
end
return 1
"""

CLAIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'billed' end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 'ok' end
return 'running'
"""

# Shared by the scripts below: take one request's entry out of a key's rate window (the
# zset `log` and the hash `toks` with its "#tokens" total, kept equal to the entries' sum).
DROP_ENTRY_LUA = """
local function drop_entry(log, toks, id)
  redis.call('ZREM', log, id)
  local held = redis.call('HGET', toks, id)
  if not held then return end
  redis.call('HDEL', toks, id)
  redis.call('HINCRBY', toks, '#tokens', -tonumber(held))
end
"""

# Admission in one round trip: expire budget reservations and window entries, check
# rpm, tpm (window total + this request's reservation) and the budget, then reserve and
# count, or, when refused, find when the window frees enough (the oldest entries holding
# the excess leave it RATE_WINDOW_S after their admission).
# Returns {admitted, requests in window, tokens in window, reserved, tokens used,
# request wait, token wait}; waits are strings (Lua numbers would come back as integers).
# The rule matches server.accounting.ledger.refusal, which words the refusal.
ADMIT_LUA = DROP_ENTRY_LUA + """
local now, window = tonumber(ARGV[3]), tonumber(ARGV[8])
local cutoff = string.format('%.17g', now - window)
local reserved = 0
local resv = redis.call('HGETALL', KEYS[3])
for i = 1, #resv, 2 do
  local tokens, expires = string.match(resv[i + 1], '(%d+) ([%d.]+)')
  if tonumber(expires) < now then redis.call('HDEL', KEYS[3], resv[i])
  else reserved = reserved + tonumber(tokens) end
end
local estimate = tonumber(ARGV[2])
local rpm, tpm, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local limited = rpm >= 0 or tpm >= 0
local rq, tk = 0, 0
if limited then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)) do
    drop_entry(KEYS[2], KEYS[4], id)
  end
  -- A request id admitted again replaces its own entry rather than adding to it.
  drop_entry(KEYS[2], KEYS[4], ARGV[1])
  rq = redis.call('ZCARD', KEYS[2])
  tk = tonumber(redis.call('HGET', KEYS[4], '#tokens') or '0')
end
local used = tonumber(redis.call('HGET', KEYS[1], 'tokens_used') or '0')
local rpm_out = rpm >= 0 and rq >= rpm
local tpm_out = tpm >= 0 and tk + estimate > tpm
if rpm_out or tpm_out or (budget >= 0 and used + reserved + estimate > budget) then
  local rwait, twait = 0, 0
  if rpm_out then
    local e = redis.call('ZRANGE', KEYS[2], rq - rpm, rq - rpm, 'WITHSCORES')
    rwait = tonumber(e[2]) + window - now
  end
  if tpm_out and estimate <= tpm then
    local excess, start = tk + estimate - tpm, 0
    twait = window
    while excess > 0 do
      local batch = redis.call('ZRANGE', KEYS[2], start, start + 99, 'WITHSCORES')
      if #batch == 0 then break end
      for i = 1, #batch, 2 do
        excess = excess - tonumber(redis.call('HGET', KEYS[4], batch[i]) or '0')
        if excess <= 0 then
          twait = tonumber(batch[i + 1]) + window - now
          break
        end
      end
      start = start + 100
    end
  end
  return {0, rq, tk, reserved, used, tostring(rwait), tostring(twait)}
end
if limited then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], estimate)
  redis.call('HINCRBY', KEYS[4], '#tokens', estimate)
  -- Both expire together, two windows after the last admission: by then nothing in
  -- them counts any more.
  redis.call('EXPIRE', KEYS[2], 2 * math.ceil(window))
  redis.call('EXPIRE', KEYS[4], 2 * math.ceil(window))
end
if budget >= 0 then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. tostring(now + tonumber(ARGV[7])))
end
return {1, rq, tk, reserved, used, '0', '0'}
"""

# Give back what a request that never ran holds: its budget reservation, and its entry
# in the rate window (tokens and request count) unless it was billed (then it ran).
RELEASE_LUA = DROP_ENTRY_LUA + """
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
drop_entry(KEYS[2], KEYS[3], ARGV[1])
return 1
"""


def _opt(v: str | bytes | None) -> int | None:
    return None if v in (None, "", b"") else int(v)


def _key(h: dict) -> KeyInfo:
    return KeyInfo(key_id=h["key_id"], name=h["name"], prefix=h["prefix"], created=int(h["created"]),
                   revoked=h.get("revoked") == "1", token_budget=_opt(h.get("token_budget")),
                   rpm=_opt(h.get("rpm")), tpm=_opt(h.get("tpm")), tokens_used=int(h.get("tokens_used") or 0),
                   share=float(h.get("share") or 1.0), band=h.get("band") or "interactive")


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
    def __init__(self, url: str, timeout_s: float = 1.0, cooldown_s: float = 0.5,
                 tls_ca: Path | None = None) -> None:
        """`url`: redis:// in plain text, rediss:// over TLS (verified against the system's
        CAs, or `tls_ca`); redis-py's URL parameters apply, e.g. `?ssl_certfile=...&
        ssl_keyfile=...` for a Redis that asks for client certificates."""
        self.url = url
        self.cooldown_s = cooldown_s
        self._down_until = 0.0
        self._failures = 0
        tls: dict[str, str] = {}
        if tls_ca is not None:
            if not url.startswith("rediss://"):
                # A CA for a plain-text connection would be silently unused: say so.
                raise ValueError(f"a Redis TLS CA ({tls_ca}) is set but the Redis URL is not rediss://; "
                                 "use rediss://HOST:PORT/DB for TLS")
            tls["ssl_ca_certs"] = str(tls_ca)
        # Short timeouts and no hidden retries: when Redis is away the service must know
        # at once, so it spools and keeps serving instead of stalling requests.
        self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                                       health_check_interval=0, **tls)
        self._record = self._r.register_script(RECORD_LUA)
        self._admit = self._r.register_script(ADMIT_LUA)
        self._claim = self._r.register_script(CLAIM_LUA)
        self._release = self._r.register_script(RELEASE_LUA)
        try:
            repair_redis(self._r, P, url.rsplit("@", 1)[-1])
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
            # Serving starts without Redis (usage is spooled); the repair runs at the next open.
            log.warning("ledger repair skipped: redis unreachable (%s)", err)

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
                  "share": repr(key.share), "band": key.band, "hash": key_hash}
        with self._r.pipeline(transaction=True) as p:
            p.hset(f"{P}key:{key.key_id}", mapping=fields)
            p.set(f"{P}keyhash:{key_hash}", key.key_id)
            p.sadd(f"{P}keys", key.key_id)
            p.execute()

    @_unavailable
    def update_key(self, key_id: str, share: float | None = None, band: str | None = None) -> KeyInfo | None:
        fields = {name: value for name, value in (("share", None if share is None else repr(share)), ("band", band))
                  if value is not None}
        name = f"{P}key:{key_id}"
        # Only an existing key is updated (HSET alone would create a stray hash).
        with self._r.pipeline(transaction=True) as p:
            while True:
                try:
                    p.watch(name)
                    if not p.hexists(name, "key_id"):
                        return None
                    p.multi()
                    if fields:
                        p.hset(name, mapping=fields)
                    p.execute()
                    break
                except redis.WatchError:
                    continue
        return self.get_key(key_id)

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
        keys = [f"{P}key:{key.key_id}", f"{P}rl:{key.key_id}", f"{P}resv:{key.key_id}", f"{P}rlt:{key.key_id}"]
        args = [request_id, estimate_tokens, repr(now), -1 if key.rpm is None else key.rpm,
                -1 if key.tpm is None else key.tpm, -1 if key.token_budget is None else key.token_budget,
                RESERVATION_TTL_S, repr(RATE_WINDOW_S)]
        ok, rq, tk, reserved, used, rwait, twait = self._admit(keys=keys, args=args)
        if int(ok):
            return Admission(True)
        fresh = KeyInfo(**{**key.__dict__, "tokens_used": int(used)})
        window = WindowState(int(rq), int(tk), float(rwait), float(twait))
        return refusal(fresh, window, int(reserved), estimate_tokens) or Admission(
            False, f"quota of key {key.key_id} reached; retry shortly", 1.0)

    @_unavailable
    def release(self, key_id: str, request_id: str) -> None:
        self._release(keys=[f"{P}resv:{key_id}", f"{P}rl:{key_id}", f"{P}rlt:{key_id}",
                            f"{P}req:{key_id}:{request_id}"], args=[request_id])

    # --- usage ------------------------------------------------------------------------------
    @_unavailable
    def record(self, rec: UsageRecord) -> bool:
        keys = [f"{P}req:{rec.key_id}:{rec.request_id}", f"{P}usage:{rec.day}:{rec.key_id}:{rec.model}",
                f"{P}key:{rec.key_id}", f"{P}rlt:{rec.key_id}", f"{P}resv:{rec.key_id}",
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
