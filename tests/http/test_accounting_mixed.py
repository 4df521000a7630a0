"""Accounting across both protocols: 100 concurrent requests, half over HTTP (the openai
SDK and raw streams that hang up), half over gRPC, on one server. The ledger's totals must
equal, to the token, the usage the clients saw (or, for those that hung up, what the
server says it billed them)."""

from __future__ import annotations

import json
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import openai

from client.client import Client
from client.types import SolError, Usage
from tests.service.harness import wait_for

N_REQUESTS = 100
SYSTEM = {"role": "system", "content": "You answer briefly and exactly. " * 3}


def _usage(prompt: int, completion: int, cached: int, cost: float) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                 total_tokens=prompt + completion, cost=cost)


def from_http(u: dict, sol: dict) -> Usage:
    return _usage(u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                  sol["cost"])


def hang_up_stream(port: int, key: str, body: dict, request_id: str, events: int) -> None:
    """Read `events` SSE events of a stream, then close the connection."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sol\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {key}\r\nIdempotency-Key: {request_id}\r\n".encode()
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        seen = b""
        while seen.count(b"data: ") < events:
            chunk = sock.recv(65536)
            if not chunk:
                break
            seen += chunk


def one(i: int, server, key: str, sdk: openai.OpenAI, grpc_client: Client, seen: dict, lookup: list,
        lock: threading.Lock) -> None:
    rng = random.Random(i)
    rid = f"mixed-{i}"
    messages = [SYSTEM, {"role": "user", "content": f"question {i}: {'why ' * rng.randint(1, 10)}"}]
    max_tokens = rng.randint(1, 30)
    usage = None
    kind = i % 6
    if kind == 0:        # HTTP unary
        r = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, n=rng.randint(1, 2),
                                        extra_headers={"Idempotency-Key": rid})
        usage = from_http(r.usage.model_dump(), r.model_extra["sol"])
    elif kind == 1:      # HTTP stream with usage
        chunks = list(sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_headers={"Idempotency-Key": rid}))
        usage = from_http(chunks[-1].usage.model_dump(), chunks[-1].model_extra["sol"])
    elif kind == 2:      # HTTP stream the client hangs up on: it asks what was billed later
        hang_up_stream(server.app.http_port, key, {"model": "tiny", "messages": messages, "max_tokens": 300,
                                                   "ignore_eos": True, "stream": True}, rid, rng.randint(1, 5))
        with lock:
            lookup.append(rid)
        return
    elif kind == 3:      # HTTP base-model completion
        r = sdk.completions.create(model="tiny", prompt=f"number {i}", max_tokens=max_tokens,
                                   extra_headers={"Idempotency-Key": rid})
        usage = from_http(r.usage.model_dump(), r.model_extra["sol"])
    elif kind == 4:      # gRPC stream
        stream = grpc_client.chat_stream(messages, model="tiny", request_id=rid, max_tokens=max_tokens)
        for _ in stream:
            pass
        usage = stream.usage
    else:                # gRPC stream cancelled abruptly
        stream = grpc_client.chat_stream(messages, model="tiny", request_id=rid, max_tokens=300, ignore_eos=True)
        try:
            for n, _ in enumerate(stream):
                if n == rng.randint(0, 3):
                    stream.close()
        except SolError:
            pass
        with lock:
            lookup.append(rid)
        return
    with lock:
        seen[rid] = usage


def test_ledger_equals_what_clients_saw_over_both_protocols(http_server, admin):
    key, info = admin.create_key("mixed")
    seen: dict[str, Usage] = {}
    lookup: list[str] = []
    lock = threading.Lock()
    errors = []
    sdk = openai.OpenAI(base_url=http_server.http_url, api_key=key, max_retries=0)
    with Client(http_server.target, api_key=key, retries=0) as c, ThreadPoolExecutor(32) as pool:
        def run(i):
            try:
                one(i, http_server, key, sdk, c, seen, lookup, lock)
            except Exception as err:  # noqa: BLE001 - asserted below
                errors.append(f"{i}: {err!r}")
        list(pool.map(run, range(N_REQUESTS)))
    assert not errors, errors[:5]
    service = http_server.app.service
    wait_for(lambda: not service.inflight.jobs and not service.background, message="requests to settle")
    with Client(http_server.target, api_key=key) as c:
        for rid in lookup:
            seen[rid] = c.request_usage(rid)
    assert len(seen) == N_REQUESTS
    report = wait_for(lambda: (r := admin.usage(key_id=info.key_id)).total.requests == N_REQUESTS and r,
                      message="the ledger to hold every request")
    t = report.total
    assert (t.prompt_tokens, t.completion_tokens, t.cached_tokens) == (
        sum(u.prompt_tokens for u in seen.values()), sum(u.completion_tokens for u in seen.values()),
        sum(u.cached_tokens for u in seen.values()))
    assert abs(t.cost - sum(u.cost for u in seen.values())) < 1e-9
    assert t.cached_tokens > 0 and t.completion_tokens > 0
    assert [m.in_flight for m in http_server.app.models.models()] == [0, 0]
