"""Fair share over HTTP: the OpenAI body's `priority` orders a key's own waiting requests
(and is validated by name), a key over --max-waiting-per-key gets 429 with a retry hint,
and the per-key gauges a /metrics scrape reads under load agree with the engine's stats."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.client import Client
from server.config import engine_config
from tests.conftest import free_port
from tests.http.test_http_api import post
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny, wait_for

LONG = {"max_tokens": 32, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def server(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fair-http")
    # One sequence per step: while one request runs, a key's next ones wait, and the third
    # waiting one is over the bound of two.
    s = RunningServer(publish_tiny(root, tiny_tokenizer, max_seq_len=1024), root / "home", http_port=free_port(),
                      metrics_port=free_port(), engine=engine_config(max_num_seqs=1, max_waiting_per_tenant=2)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key(server) -> tuple[str, str]:
    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        clear, info = admin.create_key("fair-http")
    return clear, info.key_id


def engine_stats(server):
    ((_, _, stats),) = server.app.models.stats(8)
    return stats


def scrape(server) -> dict[tuple[str, str], float]:
    """The per-key gauges of one real /metrics scrape: (metric, key id) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, s.labels["tenant"]): s.value
            for family in text_string_to_metric_families(text) if family.name.startswith("sol_tenant_")
            for s in family.samples}


@pytest.mark.parametrize("bad", ["high", 1.5, 2**31, -(2**31) - 1])
def test_priority_that_is_not_an_int32_is_400_naming_it(server, key, bad):
    status, _, body = post(server, key[0], "/v1/completions", {"model": "tiny", "prompt": "a", "priority": bad})
    err = json.loads(body)["error"]
    assert status == 400 and err["param"] == "priority", err


def test_priority_orders_a_keys_waiting_requests_the_bound_is_429_and_gauges_match_the_engine(server, key):
    clear, key_id = key
    with Client(server.target, api_key=clear, retries=0) as c:
        holder = c.complete_stream("a", "tiny", max_tokens=400, ignore_eos=True, temperature=0.0)
        tokens = iter(holder)
        next(tokens)                                   # it holds the one seat
        finished: dict[int, float] = {}

        def ask(priority: int) -> None:
            status, _, body = post(server, clear, "/v1/completions",
                                   {"model": "tiny", "prompt": "b", "priority": priority, **LONG})
            assert status == 200, body
            assert json.loads(body)["usage"]["completion_tokens"] == LONG["max_tokens"]
            finished[priority] = time.monotonic()

        # The later request has the lower priority value: it goes first among the key's own.
        threads = [threading.Thread(target=ask, args=(p,)) for p in (5, -1)]
        for i, t in enumerate(threads):
            t.start()
            wait_for(lambda n=i + 1: engine_stats(server).waiting >= n, message=f"{i + 1} waiting")

        # Under load (one running, two waiting), a scrape's per-key gauges against the
        # engine's own stats, read just before and after it.
        before = engine_stats(server)
        gauges = scrape(server)
        after = engine_stats(server)
        (mine_before,) = [t for t in before.tenants if t.tenant == key_id]
        (mine_after,) = [t for t in after.tenants if t.tenant == key_id]
        assert (mine_before.running, mine_before.waiting) == (mine_after.running, mine_after.waiting) == (1, 2)
        assert gauges[("sol_tenant_requests_running", key_id)] == 1
        assert gauges[("sol_tenant_requests_waiting", key_id)] == 2
        # The counter grows with every decoded token of the running request.
        assert mine_before.counter <= gauges[("sol_tenant_virtual_tokens", key_id)] <= mine_after.counter
        assert mine_after.counter > 0

        # A third waiting request is over the key's bound: 429, with when to retry.
        status, headers, body = post(server, clear, "/v1/completions", {"model": "tiny", "prompt": "c", **LONG})
        err = json.loads(body)["error"]
        assert status == 429 and err["type"] == "rate_limit_error", err
        retry_after = {k.lower(): v for k, v in headers.items()}["retry-after"]
        assert "--max-waiting-per-key" in err["message"] and int(retry_after) >= 1

        holder.cancel()
        for _ in tokens:
            pass
        for t in threads:
            t.join(120)
    assert set(finished) == {5, -1}
    # Each runs 32 steps alone on the seat: the order cannot be a race of the replies.
    assert finished[-1] < finished[5]
    wait_for(lambda: engine_stats(server).running == 0 and engine_stats(server).waiting == 0,
             message="the engine idle")
    # Once it has nothing in the engine, the key is gone from the gauges (bounded cardinality).
    assert ("sol_tenant_requests_running", key_id) not in scrape(server)
