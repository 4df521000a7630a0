"""Repairs at store open for values an earlier version let into a ledger: prices that
are not finite or past MAX_PRICE_PER_1K (SetPrice took NaN, inf and 1e308), and the
non-finite costs such a price left behind (every request then cost inf, and a day's
usage row stayed Infinity for good).

What it does, store by store:
- a price that fails Price.validate is deleted, with a warning: the model falls back to
  the server's default price until an admin sets a valid one;
- a usage row (per key, model and day) or a request's usage record whose cost is not
  finite gets the cost of its own token counts at the model's remaining valid price, or
  0 where none is left (the default price is 0 per token), with a warning naming the
  row and both costs. A row summed over requests billed at several prices cannot be
  told apart: the recomputed cost is at today's price, not history's.
Finite costs are never touched. Idempotent: a repaired store has nothing left to do.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3

from server.accounting.ledger import Price

log = logging.getLogger("sol.ledger")

_FINITE_MAX = 1.7976931348623157e308


def _cost(prices: dict[str, Price], model: str, prompt: int, completion: int, cached: int) -> float:
    price = prices.get(model)
    return price.cost(prompt, completion, cached) if price is not None else 0.0


def valid_prices(raw: dict[str, Price], where: str) -> tuple[dict[str, Price], list[str]]:
    """(the valid prices, the models whose price must go), warning for each."""
    good, bad = {}, []
    for model, price in raw.items():
        if price.is_valid():
            good[model] = price
        else:
            bad.append(model)
            log.warning("%s: removing the invalid price of model %s (%s); it falls back to the default price "
                        "until SetPrice sets a valid one", where, model, price)
    return good, bad


def repair_sqlite(db: sqlite3.Connection, where: str) -> int:
    """Repair an open SQLite ledger in one transaction; returns what it changed."""
    changed = 0
    db.execute("BEGIN IMMEDIATE")
    try:
        raw = {r[0]: Price(r[1], r[2], r[3]) for r in db.execute("SELECT * FROM prices")}
        prices, bad = valid_prices(raw, where)
        for model in bad:
            db.execute("DELETE FROM prices WHERE model=?", (model,))
        changed += len(bad)
        # SQLite stores NaN as NULL (refused by NOT NULL), so a non-finite cost is +-inf.
        rows = db.execute("SELECT day, key_id, model, prompt_tokens, completion_tokens, cached_tokens, cost "
                          "FROM usage WHERE cost NOT BETWEEN ? AND ?", (-_FINITE_MAX, _FINITE_MAX)).fetchall()
        for day, key_id, model, prompt, completion, cached, cost in rows:
            new = _cost(prices, model, prompt, completion, cached)
            log.warning("%s: usage of key %s, model %s, %s had cost %s; set to %s (its tokens at the current "
                        "price)", where, key_id, model, day, cost, new)
            db.execute("UPDATE usage SET cost=? WHERE day=? AND key_id=? AND model=?", (new, day, key_id, model))
        changed += len(rows)
        # Records are JSON, where json.dumps writes inf and nan as Infinity and NaN.
        for key_id, request_id, text in db.execute(
                "SELECT key_id, request_id, record FROM requests WHERE record LIKE '%Infinity%' "
                "OR record LIKE '%NaN%'").fetchall():
            record = json.loads(text)
            if math.isfinite(record.get("cost", 0.0)):
                continue
            old = record["cost"]
            record["cost"] = _cost(prices, record["model"], record["prompt_tokens"], record["completion_tokens"],
                                   record["cached_tokens"])
            log.warning("%s: usage record %s of key %s had cost %s; set to %s", where, request_id, key_id, old,
                        record["cost"])
            db.execute("UPDATE requests SET record=? WHERE key_id=? AND request_id=?",
                       (json.dumps(record), key_id, request_id))
            changed += 1
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return changed


def repair_redis(r, prefix: str, where: str) -> int:
    """Repair a Redis ledger (`r` a redis.Redis with decode_responses); returns what it
    changed. Redis itself refuses a float increment that would make NaN or inf, so a bad
    price left failed records rather than infinite sums; the prices hash is what needs
    it, and the usage hashes are checked all the same (one pipelined pass)."""
    raw: dict[str, Price] = {}
    unreadable = []
    for model, value in r.hgetall(f"{prefix}prices").items():
        try:
            a, b, c = (float(x) for x in value.split())
        except ValueError:
            unreadable.append(model)
            log.warning("%s: removing the unreadable price of model %s (%r)", where, model, value)
            continue
        raw[model] = Price(a, b, c)
    prices, bad = valid_prices(raw, where)
    if bad or unreadable:
        r.hdel(f"{prefix}prices", *bad, *unreadable)
    changed = len(bad) + len(unreadable)
    members = sorted(r.smembers(f"{prefix}usage-index"))
    with r.pipeline(transaction=False) as p:
        for member in members:
            day, key_id, model = member.split("|", 2)
            p.hmget(f"{prefix}usage:{day}:{key_id}:{model}", "cost", "prompt_tokens", "completion_tokens",
                    "cached_tokens")
        values = p.execute()
    for member, (cost, prompt, completion, cached) in zip(members, values, strict=True):
        try:
            finite = cost is None or math.isfinite(float(cost))
        except ValueError:
            finite = False
        if finite:
            continue
        day, key_id, model = member.split("|", 2)
        new = _cost(prices, model, int(prompt or 0), int(completion or 0), int(cached or 0))
        log.warning("%s: usage of key %s, model %s, %s had cost %s; set to %s (its tokens at the current price)",
                    where, key_id, model, day, cost, new)
        r.hset(f"{prefix}usage:{day}:{key_id}:{model}", "cost", repr(new))
        changed += 1
    return changed
