"""Every refusal has the right gRPC status and a message that says what to change; a
flood of bad requests does not disturb good ones."""

from __future__ import annotations

import threading

import grpc
import pytest

from client.client import Client
from client.types import SolError
from proto.sol.v1 import sol_pb2 as pb
from server.config import engine_config
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny

MSG = [{"role": "user", "content": "hi"}]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("errors")
    s = RunningServer(publish_tiny(root, tiny_tokenizer), root / "home").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(server):
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as c:
        yield c


def client_for(server, admin, **limits) -> Client:
    key, _ = admin.create_key("errors", **limits)
    return Client(server.target, api_key=key, retries=0)


@pytest.fixture(scope="module")
def client(server, admin):
    with client_for(server, admin) as c:
        yield c


def refused(fn, code: grpc.StatusCode, *words: str) -> SolError:
    with pytest.raises(SolError) as info:
        fn()
    err = info.value
    assert err.code == code, err
    for w in words:
        assert w in err.message, (w, err.message)
    return err


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"messages": []}, ["messages is empty"]),
    ({"messages": [{"role": "wizard", "content": "x"}]}, ["role 'wizard'", "assistant"]),
    ({"temperature": 3.0}, ["temperature must be in [0, 2]"]),
    ({"top_p": 0.0}, ["top_p must be in (0, 1]"]),
    ({"max_tokens": 0}, ["max_tokens must be >= 1"]),
    ({"max_tokens": 10_000}, ["lower max_tokens to at most"]),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, ["context is 256 tokens", "shorten"]),
    ({"stop": ["a"] * 9}, ["at most 8 stop strings"]),
    ({"stop": ["x" * 65]}, ["stop strings must be 1-64 characters"]),
    ({"n": 9}, ["n must be in [1, 8]"]),
    ({"logprobs": 21}, ["logprobs must be in [0, 20]"]),
    ({"model": ""}, ["model is empty"]),
    ({"model": "Bad Name!"}, ["invalid model name"]),
    ({"request_id": "has spaces"}, ["request_id must be"]),
])
def test_invalid_argument(client, kwargs, words):
    messages = kwargs.pop("messages", MSG)
    model = kwargs.pop("model", "tiny")
    refused(lambda: client.chat(messages, model=model, **kwargs), INVALID, *words)
    refused(lambda: list(client.chat_stream(messages, model=model, **kwargs)), INVALID, *words)


def test_not_found(client):
    refused(lambda: client.chat(MSG, model="nope"), grpc.StatusCode.NOT_FOUND, "'nope'", "available: tiny@1")
    refused(lambda: client.chat(MSG, model="tiny:rlhf"), grpc.StatusCode.NOT_FOUND, "tiny:rlhf")
    refused(lambda: client.chat(MSG, model="tiny@7"), grpc.StatusCode.NOT_FOUND, "tiny@7")


def test_unauthenticated(server, admin):
    with Client(server.target, api_key="", retries=0) as anon:
        anon.api_key = None
        refused(lambda: anon.chat(MSG, model="tiny"), grpc.StatusCode.UNAUTHENTICATED, "missing API key",
                "sol keys create")
    with Client(server.target, api_key="sk-sol-made-up", retries=0) as c:
        refused(lambda: c.chat(MSG, model="tiny"), grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    key, info = admin.create_key("to-revoke")
    with Client(server.target, api_key=key, retries=0) as c:
        c.chat(MSG, model="tiny", max_tokens=1)
        assert admin.revoke_key(info.key_id)
        refused(lambda: c.chat(MSG, model="tiny"), grpc.StatusCode.UNAUTHENTICATED, "revoked")
        refused(lambda: list(c.chat_stream(MSG, model="tiny")), grpc.StatusCode.UNAUTHENTICATED, "revoked")


def test_permission_denied(server, client):
    client.admin_key = client.api_key
    refused(lambda: client.list_keys(), grpc.StatusCode.PERMISSION_DENIED, "admin key")
    client.admin_key = None
    refused(lambda: client.list_keys(), grpc.StatusCode.UNAUTHENTICATED, "missing admin key")


def test_budget_spent(server, admin):
    with client_for(server, admin, token_budget=40) as c:
        c.chat(MSG, model="tiny", max_tokens=20, ignore_eos=True)      # 7 + 20 used
        err = refused(lambda: c.chat(MSG, model="tiny", max_tokens=20), grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "token budget", "lower max_tokens")
        assert err.retry_after_s is None
        c.chat(MSG, model="tiny", max_tokens=5)                          # what is left still serves


def test_rate_limited_with_retry_info(server, admin):
    with client_for(server, admin, rpm=2) as c:
        c.chat(MSG, model="tiny", max_tokens=1)
        c.chat(MSG, model="tiny", max_tokens=1)
        err = refused(lambda: c.chat(MSG, model="tiny", max_tokens=1), grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "2 requests per minute", "retry in")
        assert 0 < err.retry_after_s <= 60


def test_already_exists(client):
    client.chat(MSG, model="tiny", max_tokens=1, request_id="same-id")
    refused(lambda: client.chat(MSG, model="tiny", max_tokens=1, request_id="same-id"),
            grpc.StatusCode.ALREADY_EXISTS, "new request_id")


def test_admin_validation(admin):
    refused(lambda: admin.create_key(""), INVALID, "name must be")
    refused(lambda: admin.create_key("x", rpm=0), INVALID, "rpm must be >= 1")
    refused(lambda: admin.revoke_key("nope"), grpc.StatusCode.NOT_FOUND, "ListKeys")
    refused(lambda: admin.usage(from_day="yesterday"), INVALID, "YYYY-MM-DD")
    refused(lambda: admin.set_price("tiny", 1.0, 1.0, cached_discount=2.0), INVALID, "cached_discount")


def test_count_tokens_needs_input(client):
    refused(lambda: client.count_tokens("tiny"), INVALID, "messages", "prompt")


def test_bad_flood_leaves_good_requests_unharmed(server, client):
    expected = client.chat(MSG, model="tiny", max_tokens=12, temperature=0, ignore_eos=True)
    stub_target = server.target
    failures: list[str] = []
    stop = threading.Event()

    def flood() -> None:
        channel = grpc.insecure_channel(stub_target)
        from proto.sol.v1 import sol_pb2_grpc

        stub = sol_pb2_grpc.InferenceStub(channel)
        md = (("authorization", f"Bearer {client.api_key}"),)
        bad = [
            pb.ChatCompletionRequest(model="tiny"),
            pb.ChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="x", content="y")]),
            pb.ChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="a" * 5000)]),
            pb.ChatCompletionRequest(model="zzz", messages=[pb.ChatMessage(role="user", content="a")]),
            pb.ChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="a")],
                                     params=pb.SamplingParams(temperature=-1)),
        ]
        i = 0
        while not stop.is_set():
            try:
                stub.ChatCompletion(bad[i % len(bad)], metadata=md if i % 7 else (), timeout=10)
                failures.append("a bad request was accepted")
            except grpc.RpcError as err:
                if err.code() not in (INVALID, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                    failures.append(f"unexpected {err.code()}: {err.details()}")
            i += 1
        channel.close()

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        results = []
        workers = [threading.Thread(target=lambda: results.append(
            client.chat(MSG, model="tiny", max_tokens=12, temperature=0, ignore_eos=True))) for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert len(results) == 8
    for r in results:
        assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == expected.usage.prompt_tokens
        assert r.text == expected.text


def test_unavailable_while_draining(tiny_checkpoint, tmp_path):
    registry, _ = tiny_checkpoint
    s = RunningServer(registry.root, tmp_path / "home").start()
    try:
        with Client(s.target, admin_key=ADMIN_KEY) as admin:
            key, _ = admin.create_key("drain")
        s.app.service.draining = True
        with Client(s.target, api_key=key, retries=0) as c:
            refused(lambda: c.chat(MSG, model="tiny"), grpc.StatusCode.UNAVAILABLE, "shutting down", "retry")
    finally:
        s.app.service.draining = False
        s.stop()


def test_queue_full_is_resource_exhausted(tiny_checkpoint, tmp_path):
    registry, _ = tiny_checkpoint
    # A tiny KV cache and waiting queue: a burst must overflow the queue.
    s = RunningServer(registry.root, tmp_path / "home", engine=engine_config(max_waiting=2, num_blocks=12)).start()
    try:
        with Client(s.target, admin_key=ADMIN_KEY) as admin:
            key, _ = admin.create_key("burst")
        errors: list[SolError] = []
        served = []

        def one() -> None:
            with Client(s.target, api_key=key, retries=0) as c:
                try:
                    served.append(c.chat(MSG, model="tiny", max_tokens=150, ignore_eos=True))
                except SolError as err:
                    errors.append(err)

        threads = [threading.Thread(target=one) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors and served
        for err in errors:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in err.message
            assert err.retry_after_s and err.retry_after_s > 0
    finally:
        s.stop()


def test_keys_are_stored_hashed(server, admin):
    key, _ = admin.create_key("secret-check")
    raw = b"".join(p.read_bytes() for p in (server.config.home).glob("ledger.sqlite3*"))
    assert key.encode() not in raw and key[len("sk-sol-"):].encode() not in raw
