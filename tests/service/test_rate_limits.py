"""Rate limits that hold under concurrency, on both ledgers (Redis and the embedded
SQLite): tokens per minute are reserved at admission (prompt + max_tokens x n) and
settled to the actual usage, requests per minute are counted atomically, replicas
sharing Redis share the window, and a refusal's retry-after says when the sliding
window has room again. Also: the fallback while the store is away, and the messages
for the admin key used for inference and for a default max_tokens that does not fit."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from client.client import Client
from client.types import SolError
from server.accounting.ledger import RATE_WINDOW_S, KeyInfo, StoreUnavailable, UsageRecord, utc_day
from server.accounting.quota import QuotaGate
from tests.conftest import RedisServer
from tests.service.harness import ADMIN_KEY, RunningServer

MSG = [{"role": "user", "content": "hi"}]
SIZE = 35                  # tokens each request reserves: prompt + max_tokens


# --- the stores ---------------------------------------------------------------------------

def make_key(store, key_id: str = "k1", **limits) -> KeyInfo:
    key = KeyInfo(key_id=key_id, name="rl", prefix="sk-sol-rl", created=int(time.time()), **limits)
    store.create_key(key, "hash-" + key_id)
    return key


def usage(request_id: str, total: int, key_id: str = "k1", prompt: int = 7) -> UsageRecord:
    return UsageRecord(key_id=key_id, request_id=request_id, model="tiny", version=1, prompt_tokens=prompt,
                       completion_tokens=total - prompt, cached_tokens=0, cost=0.0, day=utc_day())


def burst(admit, n: int = 20) -> list[int]:
    """`admit(i)` from n threads released at once; the indices admitted."""
    admitted: list[int] = []
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait()
        if admit(i).admitted:
            admitted.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return admitted


def test_concurrent_tpm_reserves(store):
    key = make_key(store, tpm=100)
    assert len(burst(lambda i: store.admit(key, f"r{i}", SIZE, time.time()))) == 2     # 70; a third is 105


def test_concurrent_rpm_counts(store):
    key = make_key(store, rpm=3)
    assert len(burst(lambda i: store.admit(key, f"r{i}", 1, time.time()))) == 3


def test_sqlite_connections_share_the_window(tmp_path):
    """Two stores on one file, as two processes would open it: one transaction each."""
    from server.accounting.ledger_sqlite import SqliteStore

    a, b = SqliteStore(tmp_path / "l.sqlite3"), SqliteStore(tmp_path / "l.sqlite3")
    try:
        key = make_key(a, tpm=100, rpm=50)
        admitted = burst(lambda i: (a if i % 2 else b).admit(key, f"r{i}", SIZE, time.time()))
        assert len(admitted) == 2
    finally:
        a.close()
        b.close()


def test_retry_after_is_when_the_window_frees(store):
    key = make_key(store, tpm=100, rpm=3)
    t0 = time.time()
    assert store.admit(key, "a", SIZE, t0).admitted
    assert store.admit(key, "b", SIZE, t0 + 10).admitted
    # 70 + 35 > 100: room comes when "a" leaves the window, 60 s after its admission.
    refused = store.admit(key, "c", SIZE, t0 + 20)
    assert not refused.admitted and "tokens per minute" in refused.reason
    assert refused.retry_after_s == pytest.approx(40, abs=0.01)
    assert not store.admit(key, "c", SIZE, t0 + RATE_WINDOW_S - 0.01).admitted
    assert store.admit(key, "c", SIZE, t0 + RATE_WINDOW_S).admitted
    # A need of 100 waits for both "b" and "c" to leave; rpm (b, c: 2 of 3) is not the limit.
    refused = store.admit(key, "d", 100, t0 + RATE_WINDOW_S)
    assert refused.retry_after_s == pytest.approx(RATE_WINDOW_S, abs=0.01)
    # rpm: the third of three slots is taken at t0+61; the oldest of them leaves at t0+70.
    assert store.admit(key, "e", 1, t0 + 61).admitted
    refused = store.admit(key, "f", 1, t0 + 62)
    assert "requests per minute" in refused.reason and refused.retry_after_s == pytest.approx(8, abs=0.01)


def test_request_larger_than_tpm_never_fits(store):
    key = make_key(store, tpm=100)
    refused = store.admit(key, "r1", 101, time.time())
    assert not refused.admitted and refused.retry_after_s == 0 and "lower max_tokens" in refused.reason


def test_record_settles_and_release_gives_back(store):
    key = make_key(store, tpm=100, rpm=4)
    now = time.time()
    assert store.admit(key, "a", SIZE, now).admitted
    assert store.record(usage("a", 8))                 # reserved 35, used 8: 27 come back
    assert not store.record(usage("a", 8))             # a replay settles nothing twice
    assert store.admit(key, "b", SIZE, now).admitted
    assert store.admit(key, "c", SIZE, now).admitted    # 8 + 35 + 35 = 78
    assert not store.admit(key, "d", 23, now).admitted
    assert store.admit(key, "d", 22, now).admitted      # exactly 100
    store.release("k1", "d")                           # never ran: its tokens and its request come back
    store.release("k1", "a")                           # billed: it ran, and stays counted
    assert store.admit(key, "e", 22, now).admitted
    assert not store.admit(key, "f", 1, now).admitted   # rpm: a, b, c, e


# --- the gate: messages and the fallback while the store is away --------------------------

async def _inline(fn, *args):
    return fn(*args)


class Down:
    """A store that is unreachable."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise StoreUnavailable("down")
        return fail


def test_default_max_tokens_refusal_says_so(store):
    key = make_key(store, token_budget=200)
    gate = QuotaGate(store, _inline)
    refused = asyncio.run(gate.admit(key, "r1", 7 + 249, max_tokens=249, n=1, max_tokens_given=False))
    assert not refused.admitted and "spent" not in refused.reason
    for words in ("did not set max_tokens", "default max_tokens of 249", "200 of 200 tokens left",
                  "send max_tokens of at most 193"):
        assert words in refused.reason, (words, refused.reason)
    given = asyncio.run(gate.admit(key, "r1", 7 + 249, max_tokens=249, n=1))
    assert "lower max_tokens" in given.reason and "default" not in given.reason


def test_fallback_keeps_the_rate_window_while_the_store_is_away(store):
    key = make_key(store, tpm=100, rpm=4)
    gate = QuotaGate(store, _inline)

    async def admit(rid: str, tokens: int = SIZE):
        return await gate.admit(key, rid, tokens)

    assert asyncio.run(admit("a")).admitted                  # through the store, mirrored here
    gate.note_usage("k1", 8, "a")                            # settled: 8
    gate.store = Down()
    # The window did not start empty when the store went: 8 + 35 + 35 = 78, then 22 fits.
    assert [asyncio.run(admit(r)).admitted for r in "bcd"] == [True, True, False]
    assert asyncio.run(admit("e", 22)).admitted
    refused = asyncio.run(admit("f", 1))
    assert not refused.admitted and refused.retry_after_s > 0
    asyncio.run(gate.release(key, "e"))                       # never ran: given back here too
    assert asyncio.run(admit("f", 22)).admitted
    assert "requests per minute" in asyncio.run(admit("g", 1)).reason    # a, b, c, f
    assert not asyncio.run(admit("h", 1)).admitted


# --- a real server on each ledger ---------------------------------------------------------

@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request, tmp_path_factory, tiny_tokenizer):
    from gpt.registry import Registry, publish_checkpoint
    from tests.conftest import make_tiny_model

    root = tmp_path_factory.mktemp(f"rl-{request.param}")
    registry = Registry(root / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer), tiny_tokenizer, {"stage": "base"},
                       aliases=("base",))
    redis = None
    if request.param == "redis":
        redis = RedisServer(root)
        redis.start()
    s = RunningServer(registry.root, root / "home", redis_url=redis.url if redis else None).start()
    yield s
    s.stop()
    if redis is not None:
        redis.stop()


@pytest.fixture(scope="module")
def admin(server):
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as c:
        yield c


def limited(targets: list[str], admin: Client, **limits) -> tuple[list[Client], str]:
    key, info = admin.create_key("rl", **limits)
    clients = [Client(t, api_key=key, retries=0) for t in targets]
    clients[0].count_tokens("tiny", messages=MSG)          # warm the key cache before the burst
    return clients, info.key_id


def concurrent_chats(clients: list[Client], n: int = 20, **params) -> tuple[list, list[SolError]]:
    """n chats at once, spread over `clients`: (completions, refusals)."""
    done, refused = [], []

    def one(i: int) -> None:
        try:
            done.append(clients[i % len(clients)].chat(MSG, model="tiny", request_id=f"burst-{i}", **params))
        except SolError as err:
            refused.append(err)

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    return done, refused


def check_refusals(refused: list[SolError], words: str) -> None:
    for err in refused:
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert words in err.message, err.message
        assert err.retry_after_s is not None and 0 < err.retry_after_s <= RATE_WINDOW_S, err


def test_tpm_holds_under_20_concurrent_requests(server, admin):
    (c,), key_id = limited([server.target], admin, tpm=100)
    prompt = c.count_tokens("tiny", messages=MSG)
    done, refused = concurrent_chats([c], max_tokens=SIZE - prompt, ignore_eos=True)
    assert len(done) == 2 and len(refused) == 18
    check_refusals(refused, "tokens per minute")
    total = admin.usage(key_id=key_id).total
    assert total.total_tokens == sum(r.usage.total_tokens for r in done) == 2 * SIZE <= 100
    c.close()


def test_rpm_holds_under_20_concurrent_requests(server, admin):
    (c,), key_id = limited([server.target], admin, rpm=3)
    done, refused = concurrent_chats([c], max_tokens=1)
    assert len(done) == 3 and len(refused) == 17
    check_refusals(refused, "requests per minute")
    assert admin.usage(key_id=key_id).total.requests == 3
    c.close()


def test_settlement_frees_what_a_request_did_not_use(server, admin):
    (c,), key_id = limited([server.target], admin, tpm=100)
    prompt = c.count_tokens("tiny", messages=MSG)
    # The greedy first token, found on a key without limits, stops the limited request
    # after one token: it reserves 35 and uses prompt + 1.
    probe_key, _ = admin.create_key("probe")
    with Client(server.target, api_key=probe_key) as probe:
        stream = probe.chat_stream(MSG, model="tiny", temperature=0.0, max_tokens=1)
        first = [t for chunk in stream for d in chunk.deltas for t in d.token_ids][0]
    short = c.chat(MSG, model="tiny", temperature=0.0, max_tokens=SIZE - prompt, stop_token_ids=[first]).usage
    assert short.total_tokens < SIZE
    full = {"max_tokens": SIZE - prompt, "ignore_eos": True}
    c.chat(MSG, model="tiny", **full)
    c.chat(MSG, model="tiny", **full)          # without settlement: 105 > 100, refused
    left = 100 - short.total_tokens - 2 * SIZE
    c.chat(MSG, model="tiny", max_tokens=left - prompt, ignore_eos=True)     # exactly the rest
    with pytest.raises(SolError) as err:
        c.chat(MSG, model="tiny", max_tokens=1)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admin.usage(key_id=key_id).total.total_tokens == 100
    c.close()


def test_default_max_tokens_that_does_not_fit_the_budget(server, admin):
    (c,), _ = limited([server.target], admin, token_budget=200)
    prompt = c.count_tokens("tiny", messages=MSG)
    with pytest.raises(SolError) as err:
        c.chat(MSG, model="tiny")
    msg = err.value.message
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "spent" not in msg
    assert "did not set max_tokens" in msg and f"send max_tokens of at most {200 - prompt}" in msg, msg
    c.chat(MSG, model="tiny", max_tokens=200 - prompt)
    c.close()


def test_admin_key_for_inference_says_what_it_is(server):
    with Client(server.target, api_key=ADMIN_KEY, retries=0) as c, pytest.raises(SolError) as err:
        c.chat(MSG, model="tiny", max_tokens=1)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "admin key" in err.value.message and "needs an API key" in err.value.message


def test_two_replicas_sharing_redis_stay_within_the_limits(tiny_checkpoint, tmp_path, redis_server):
    registry, _ = tiny_checkpoint
    a = RunningServer(registry.root, tmp_path / "a", redis_url=redis_server.url).start()
    b = RunningServer(registry.root, tmp_path / "b", redis_url=redis_server.url).start()
    try:
        with Client(a.target, admin_key=ADMIN_KEY, retries=0) as admin:
            clients, tpm_key = limited([a.target, b.target], admin, tpm=100)
            clients[1].count_tokens("tiny", messages=MSG)
            prompt = clients[0].count_tokens("tiny", messages=MSG)
            done, refused = concurrent_chats(clients, max_tokens=SIZE - prompt, ignore_eos=True)
            assert len(done) == 2
            check_refusals(refused, "tokens per minute")
            assert admin.usage(key_id=tpm_key).total.total_tokens == 2 * SIZE

            rpm_clients, rpm_key = limited([a.target, b.target], admin, rpm=3)
            rpm_clients[1].count_tokens("tiny", messages=MSG)
            done, refused = concurrent_chats(rpm_clients, max_tokens=1)
            assert len(done) == 3
            check_refusals(refused, "requests per minute")
            assert admin.usage(key_id=rpm_key).total.requests == 3
            for c in clients + rpm_clients:
                c.close()
    finally:
        a.stop()
        b.stop()
