"""Accounting under load: 200 concurrent mixed requests (unary, streams, graceful and
abrupt cancellations, deadlines, errors). The ledger's totals must equal the sum of the
usage the clients received, to the token, on both ledgers, and also when Redis is
killed in the middle of the run and comes back (spool + idempotent replay)."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from client.client import Client
from client.types import SolError, Usage
from tests.service.harness import ADMIN_KEY, RunningServer, wait_for

N_REQUESTS = 200
SYSTEM = {"role": "system", "content": "You answer briefly and exactly. " * 3}


class Outcomes:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.usage: dict[str, Usage] = {}      # request id -> usage the client received
        self.lookup: list[str] = []             # request ids whose usage the client must ask for
        self.errors: dict[str, int] = {}
        self.done = 0
        self.progress = threading.Condition(self.lock)

    def finish(self, request_id: str, usage: Usage | None = None, error: str | None = None,
               lookup: bool = False) -> None:
        with self.lock:
            if usage is not None:
                self.usage[request_id] = usage
            if lookup:
                self.lookup.append(request_id)
            if error:
                self.errors[error] = self.errors.get(error, 0) + 1
            self.done += 1
            self.progress.notify_all()


def one_request(c: Client, i: int, out: Outcomes) -> None:
    rng = random.Random(i)
    rid = f"load-{i}"
    messages = [SYSTEM, {"role": "user", "content": f"question number {i}: {'why ' * rng.randint(1, 12)}"}]
    kind = i % 6
    max_tokens = rng.randint(1, 40)
    try:
        if kind == 0:
            out.finish(rid, c.chat(messages, model="tiny", request_id=rid, max_tokens=max_tokens).usage)
        elif kind == 1:
            stream = c.chat_stream(messages, model="tiny", request_id=rid, max_tokens=max_tokens, n=rng.randint(1, 3))
            for _ in stream:
                pass
            out.finish(rid, stream.usage)
        elif kind == 2:      # graceful cancel: the final chunk still brings the usage
            stream = c.chat_stream(messages, model="tiny", request_id=rid, max_tokens=150, ignore_eos=True)
            cut = rng.randint(1, 5)
            for n, _ in enumerate(stream):
                if n == cut:
                    stream.cancel()
            assert stream.usage is not None and stream.finish_reasons[0] in ("abort", "length")
            out.finish(rid, stream.usage)
        elif kind == 3:      # abrupt: the client drops the stream; it asks what was billed later
            stream = c.chat_stream(messages, model="tiny", request_id=rid, max_tokens=150, ignore_eos=True)
            cut = rng.randint(0, 4)
            try:
                for n, _ in enumerate(stream):
                    if n == cut:
                        stream.close()
            except SolError as err:
                assert err.code == grpc.StatusCode.CANCELLED
            out.finish(rid, lookup=True)
        elif kind == 4:      # a deadline the request cannot meet
            try:
                c.chat(messages, model="tiny", request_id=rid, max_tokens=150, ignore_eos=True,
                       timeout=rng.uniform(0.005, 0.05))
                out.finish(rid, lookup=True)
            except SolError as err:
                assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
                out.finish(rid, lookup=True, error="deadline")
        else:                # refused before admission: never billed
            bad = rng.choice([{"temperature": 9.0}, {"model": "nope"}, {"max_tokens": 100_000}])
            model = bad.pop("model", "tiny")
            try:
                c.chat(messages, model=model, request_id=rid, **bad)
                raise AssertionError("a bad request was served")
            except SolError as err:
                assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), err
                out.finish(rid, error=err.code.name)
    except Exception as err:  # noqa: BLE001 - recorded and asserted on below
        out.finish(rid, error=f"unexpected {err!r}")


def run_load(server: RunningServer, key: str, out: Outcomes) -> None:
    with Client(server.target, api_key=key, retries=0) as c, ThreadPoolExecutor(64) as pool:
        list(pool.map(lambda i: one_request(c, i, out), range(N_REQUESTS)))


@pytest.mark.parametrize("ledger", ["sqlite", "redis", "redis-killed"])
def test_ledger_totals_equal_what_clients_received(ledger, tiny_checkpoint, tmp_path, request):
    registry, _ = tiny_checkpoint
    redis = None
    if ledger != "sqlite":
        redis = request.getfixturevalue("durable_redis")
    server = RunningServer(registry.root, tmp_path / "home", redis_url=redis.url if redis else None).start()
    try:
        with Client(server.target, admin_key=ADMIN_KEY) as admin:
            admin.set_price("tiny", prompt_per_1k=1.0, completion_per_1k=2.0, cached_discount=0.5)
            key, info = admin.create_key("load")
            with Client(server.target, api_key=key) as c:   # warms the server's key cache
                c.chat([{"role": "user", "content": "hi"}], model="tiny", max_tokens=1, request_id="warm")
            out = Outcomes()
            chaos = None
            if ledger == "redis-killed":
                def kill_and_restart() -> None:
                    with out.progress:
                        out.progress.wait_for(lambda: out.done >= N_REQUESTS // 4)
                    redis.stop()
                    with out.progress:
                        out.progress.wait_for(lambda: out.done >= N_REQUESTS * 2 // 3)
                    spooled = len(server.app.spool)
                    redis.start()
                    out.spooled_while_down = spooled
                chaos = threading.Thread(target=kill_and_restart)
                chaos.start()
            run_load(server, key, out)
            if chaos is not None:
                chaos.join()
                assert out.spooled_while_down > 0, "Redis was down but nothing was spooled"

            unexpected = {k: v for k, v in out.errors.items() if k.startswith("unexpected")}
            assert not unexpected, unexpected
            # Everything the server accepted is finished and billed (background billing of
            # dropped clients included) before the client asks what dropped requests cost.
            inference = server.app.service
            wait_for(lambda: not inference.inflight.jobs and not inference.background, message="requests to settle")
            # Every checkout of the model was given back (hot-load retires versions on this count).
            assert [m.in_flight for m in server.app.models.models()] == [0]
            # ... and, after an outage, once the ledger store takes writes again.
            wait_for(lambda: len(server.app.spool) == 0 and server.app.accountant.store_up, timeout=30,
                     message="the spool to drain")
            with Client(server.target, api_key=key) as c:
                for rid in out.lookup:
                    try:
                        out.usage[rid] = c.request_usage(rid)
                    except SolError as err:
                        # A deadline that fired before admission: nothing ran, nothing billed.
                        assert err.code == grpc.StatusCode.NOT_FOUND, err
                        assert rid in {f"load-{i}" for i in range(N_REQUESTS) if i % 6 == 4}
                warm = c.request_usage("warm")
            received = Usage()
            for u in [warm, *out.usage.values()]:
                received.prompt_tokens += u.prompt_tokens
                received.completion_tokens += u.completion_tokens
                received.cached_tokens += u.cached_tokens
                received.cost += u.cost

            def settled():
                report = admin.usage(key_id=info.key_id)
                return report if report.spooled_records == 0 and report.total.requests == len(out.usage) + 1 else None

            report = wait_for(settled, timeout=30, message="the spool to drain into the ledger")
            t = report.total
            assert (t.prompt_tokens, t.completion_tokens, t.cached_tokens) == (
                received.prompt_tokens, received.completion_tokens, received.cached_tokens)
            assert t.cost == pytest.approx(received.cost, rel=1e-9)
            assert received.cached_tokens > 0          # the shared system prompt was cached
            assert received.completion_tokens > 0
            (key_row,) = [k for k in admin.list_keys() if k.key_id == info.key_id]
            assert key_row.tokens_used == t.total_tokens
    finally:
        server.stop()


def test_partitioned_redis_does_not_stall_serving(tiny_checkpoint, tmp_path, durable_redis):
    """Redis that accepts connections and never answers (a network partition): requests
    keep their speed (the breaker stops them each waiting out a socket timeout), usage
    is spooled, and replayed exactly once Redis is back."""
    import socket
    import time

    registry, _ = tiny_checkpoint
    server = RunningServer(registry.root, tmp_path / "home", redis_url=durable_redis.url,
                           store_timeout_s=0.5).start()
    blackhole = None
    try:
        with Client(server.target, admin_key=ADMIN_KEY) as admin, \
                Client(server.target, api_key=admin.create_key("partition")[0]) as c:
            info = [k for k in admin.list_keys() if k.name == "partition"][0]
            usages = [c.chat([{"role": "user", "content": "warm"}], model="tiny", max_tokens=2).usage]
            durable_redis.stop()
            blackhole = socket.socket()
            blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            blackhole.bind(("127.0.0.1", durable_redis.port))
            blackhole.listen(128)
            t0 = time.monotonic()
            for i in range(20):
                usages.append(c.chat([{"role": "user", "content": f"q{i}"}], model="tiny", max_tokens=2).usage)
            elapsed = time.monotonic() - t0
            # Without the breaker each request waits out >= 0.5 s of socket timeout (>= 10 s).
            assert elapsed < 6, elapsed
            assert len(server.app.spool) > 0
            blackhole.close()
            blackhole = None
            durable_redis.start()
            report = wait_for(lambda: (r := admin.usage(key_id=info.key_id)).spooled_records == 0
                              and r.total.requests == 21 and r, timeout=30, message="replay")
            assert report.total.prompt_tokens == sum(u.prompt_tokens for u in usages)
            assert report.total.completion_tokens == sum(u.completion_tokens for u in usages)
    finally:
        if blackhole is not None:
            blackhole.close()
        server.stop()
