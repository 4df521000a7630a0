"""Requests the server ends on its own account, billed and with a reason instead of
silence: a revoked key's running requests (this replica at once, another within the
key cache's life), and what still runs when the drain's grace period ends (an HTTP
stream then ends with an error event in OpenAI's shape)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from bench.crash import SseResult, stream_chat
from client.client import Client
from client.types import SolError
from tests.conftest import free_port
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny, wait_for

MSG = [{"role": "user", "content": "go on"}]
LONG = 1500


@pytest.fixture
def registry_root(tiny_tokenizer, tmp_path):
    return publish_tiny(tmp_path, tiny_tokenizer, max_seq_len=2048)


class GrpcReader(threading.Thread):
    """Reads a gRPC stream in the background, counting token ids received."""

    def __init__(self, target: str, key: str, request_id: str, n: int = 1) -> None:
        super().__init__(daemon=True)
        self.client = Client(target, api_key=key, retries=0)
        self.stream = self.client.chat_stream(MSG, model="tiny", max_tokens=LONG, ignore_eos=True, n=n,
                                              request_id=request_id)
        self.tokens = 0
        self.error: SolError | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            for chunk in self.stream:
                self.tokens += sum(len(d.token_ids) for d in chunk.deltas)
        except SolError as err:
            self.error = err
        finally:
            self.ended_at = time.monotonic()
            self.client.close()


class HttpReader(threading.Thread):
    def __init__(self, port: int, key: str, request_id: str, n: int = 1) -> None:
        super().__init__(daemon=True)
        self.args = (port, key, {"model": "tiny", "messages": MSG, "max_tokens": LONG, "ignore_eos": True, "n": n},
                     request_id)
        self.result = SseResult()
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            stream_chat(*self.args, result=self.result)
        finally:
            self.ended_at = time.monotonic()


def test_revoking_a_key_ends_its_running_requests_here_and_on_other_replicas(registry_root, tmp_path,
                                                                             durable_redis):
    a = RunningServer(registry_root, tmp_path / "a", redis_url=durable_redis.url, http_port=free_port()).start()
    b = RunningServer(registry_root, tmp_path / "b", redis_url=durable_redis.url).start()
    try:
        with Client(a.target, admin_key=ADMIN_KEY) as admin:
            key, info = admin.create_key("revoked")
            readers = [GrpcReader(a.target, key, "here-grpc"), HttpReader(a.app.http_port, key, "here-http", n=8),
                       GrpcReader(b.target, key, "there-grpc", n=2)]
            for r in readers:
                r.start()
            wait_for(lambda: readers[0].tokens > 20 and readers[1].result.tokens > 20 and readers[2].tokens > 20,
                     timeout=60, message="the streams to be running")
            before = [readers[0].tokens, readers[1].result.tokens, readers[2].tokens]
            revoked_at = time.monotonic()
            admin.revoke_key(info.key_id)
            for r in readers:
                r.join(30)
        here_grpc, here_http, there = readers
        # This replica: at once (the next engine step); the other: within its key cache's life.
        assert here_grpc.ended_at - revoked_at < 1.0 and here_http.ended_at - revoked_at < 1.0
        assert there.ended_at - revoked_at < b.config.auth_cache_s + 1.0
        assert here_grpc.error.code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in here_grpc.error.message
        assert there.error.code == grpc.StatusCode.UNAUTHENTICATED
        assert here_http.result.error["code"] == "unauthenticated" and "revoked" in here_http.result.error["message"]
        # Far from the full run (an n=8 request had gone on to 2,003 tokens after a revoke).
        assert here_grpc.tokens - before[0] < 64 and here_http.result.tokens - before[1] < 8 * 40
        # Billed for what they generated: what the clients received, at least.
        for rid, got in (("here-grpc", here_grpc.tokens), ("here-http", here_http.result.tokens),
                         ("there-grpc", there.tokens)):
            rec = wait_for(lambda rid=rid: a.app.store.get_record(info.key_id, rid), timeout=10,
                           message=f"{rid} billed")
            assert got <= rec.completion_tokens <= got + 8 * 32, (rid, got, rec)
    finally:
        a.stop()
        b.stop()


def test_requests_cut_by_the_drain_end_with_an_error_and_are_billed(registry_root, tmp_path):
    server = RunningServer(registry_root, tmp_path / "home", http_port=free_port(), grace_period_s=0.5).start()
    stopped = False
    try:
        with Client(server.target, admin_key=ADMIN_KEY) as admin:
            key, info = admin.create_key("drained")
        readers = [HttpReader(server.app.http_port, key, "cut-http"), GrpcReader(server.target, key, "cut-grpc")]
        for r in readers:
            r.start()
        wait_for(lambda: readers[0].result.tokens > 5 and readers[1].tokens > 5, timeout=60,
                 message="the streams to be running")
        server.call(server.app.drain())
        stopped = True
        for r in readers:
            r.join(30)
        http_reader, grpc_reader = readers
        assert http_reader.result.error is not None, "the HTTP stream stopped without an error event"
        assert http_reader.result.error["code"] == "unavailable"
        assert "grace period" in http_reader.result.error["message"] and not http_reader.result.done
        assert grpc_reader.error.code == grpc.StatusCode.UNAVAILABLE
        from server.accounting.ledger_sqlite import SqliteStore

        store = SqliteStore(server.config.ledger_path)
        for rid, got in (("cut-http", http_reader.result.tokens), ("cut-grpc", grpc_reader.tokens)):
            rec = store.get_record(info.key_id, rid)
            assert rec is not None and got <= rec.completion_tokens <= got + 32, (rid, got, rec)
        store.close()
    finally:
        if not stopped:
            server.stop()
        else:
            server.loop.call_soon_threadsafe(server.loop.stop)
