"""SIGTERM on a real `sol serve` process with streams in flight (gRPC and HTTP): readiness
flips to NOT_SERVING first, new requests are refused with UNAVAILABLE (HTTP 503), the
running streams finish with their usage, the ledger holds every token, the process exits 0."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.client import Client
from client.types import SolError, Usage
from gpt.registry import Registry, publish_checkpoint
from server.accounting.ledger_sqlite import SqliteStore
from tests.conftest import free_port, make_tiny_model
from tests.service.harness import wait_for

REPO = Path(__file__).resolve().parents[2]
ADMIN = "sk-sol-admin-shutdown"
N_STREAMS = 6
MAX_TOKENS = 1200


def readiness(target: str) -> int | None:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        except grpc.RpcError:
            return None


def test_sigterm_drains_streams_then_exits_zero(tiny_tokenizer, tmp_path):
    home = tmp_path / "home"
    registry = Registry(home / "registry")
    # A longer context so the streams are still running when the signal arrives.
    publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer, max_seq_len=2048), tiny_tokenizer,
                       {"stage": "base"})
    port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "SOL_HOME": str(home), "SOL_ADMIN_KEY": ADMIN, "SOL_KEY_PEPPER": "p"}
    env.pop("SOL_REDIS_URL", None)
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0", "--http-port", str(http_port), "--grace-period", "60"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: readiness(target) == health_pb2.HealthCheckResponse.SERVING, timeout=120,
                 interval=0.1, message="the server to become ready")
        with Client(target, admin_key=ADMIN) as admin:
            key, info = admin.create_key("shutdown")

        events: list[tuple[str, float]] = []
        lock = threading.Lock()
        started = threading.Barrier(N_STREAMS + 2)

        # Watch readiness on a stream opened before the signal.
        def watch() -> None:
            with grpc.insecure_channel(target) as ch:
                for reply in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="")):
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        with lock:
                            events.append(("not_serving", time.monotonic()))
                        return

        usages = []

        def stream_one(i: int) -> None:
            with Client(target, api_key=key) as c:
                s = c.chat_stream([{"role": "user", "content": f"stream {i}"}], model="tiny",
                                  max_tokens=MAX_TOKENS, ignore_eos=True)
                first = True
                for _ in s:
                    if first:
                        started.wait()
                        first = False
                with lock:
                    events.append(("stream_done", time.monotonic()))
                    usages.append((s.usage, s.finish_reasons))

        def http_stream() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=120)
            conn.request("POST", "/v1/chat/completions", json.dumps({
                "model": "tiny", "messages": [{"role": "user", "content": "http stream"}], "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}),
                {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            reply = conn.getresponse()
            started.wait()
            events_seen = [line[6:] for line in reply.read().decode().split("\n\n") if line.startswith("data: ")]
            assert events_seen[-1] == "[DONE]"
            u = json.loads(events_seen[-2])["usage"]
            with lock:
                events.append(("stream_done", time.monotonic()))
                usages.append((Usage(u["prompt_tokens"], u["completion_tokens"]), {0: "length"}))

        def http_status(method: str, path: str, body: dict | None = None):
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
            conn.request(method, path, json.dumps(body) if body else None,
                         {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.headers

        assert http_status("GET", "/ready")[0] == 200
        watcher = threading.Thread(target=watch)
        watcher.start()
        streams = [threading.Thread(target=stream_one, args=(i,)) for i in range(N_STREAMS)]
        streams.append(threading.Thread(target=http_stream))
        for t in streams:
            t.start()
        started.wait()                       # every stream has its first tokens
        proc.send_signal(signal.SIGTERM)
        watcher.join(30)
        assert events and events[0][0] == "not_serving", events

        # New work is refused while the old finishes.
        with Client(target, api_key=key, retries=0) as c:
            try:
                c.chat([{"role": "user", "content": "late"}], model="tiny", max_tokens=1)
                raise AssertionError("a request was accepted during the drain")
            except SolError as err:
                assert err.code == grpc.StatusCode.UNAVAILABLE, err
        assert http_status("GET", "/ready")[0] == 503
        status, headers = http_status("POST", "/v1/chat/completions",
                                      {"model": "tiny", "messages": [{"role": "user", "content": "late"}]})
        assert status == 503 and headers["Retry-After"] == "1"

        for t in streams:
            t.join(120)
        assert proc.wait(timeout=60) == 0
        assert [e for e, _ in events].count("stream_done") == N_STREAMS + 1
        assert all(u.completion_tokens == MAX_TOKENS and f == {0: "length"} for u, f in usages), usages

        # The ledger (embedded SQLite) holds every token the clients were told about.
        store = SqliteStore(home / "ledger.sqlite3")
        (row,) = store.usage(key_id=info.key_id)
        store.close()
        assert row.requests == N_STREAMS + 1
        assert row.completion_tokens == sum(u.completion_tokens for u, _ in usages)
        assert row.prompt_tokens == sum(u.prompt_tokens for u, _ in usages)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        print((tmp_path / "serve.log").read_text())
