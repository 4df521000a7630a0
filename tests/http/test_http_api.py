"""The HTTP API below the SDK: raw requests for malformed bodies, size limits, routes,
health, the OpenAPI document, the playground's files, metrics by protocol, and clients
that hang up (mid-stream and mid-unary) being aborted and billed once."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

from client.client import Client
from tests.http.conftest import engine_idle
from tests.service.harness import wait_for

USER = [{"role": "user", "content": "tell me a long story"}]


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.app.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def post(server, key: str, path: str, payload, headers: dict | None = None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(server, "POST", path, body, {"Authorization": f"Bearer {key}",
                                                "Content-Type": "application/json", **(headers or {})})


def test_malformed_json_is_400(http_server, api_key):
    status, _, body = post(http_server, api_key, "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    err = json.loads(body)["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]
    status, _, body = post(http_server, api_key, "/v1/chat/completions", {"model": "tiny"})
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"
    status, _, body = post(http_server, api_key, "/v1/completions",
                           b'{"model": "tiny", "prompt": "\\ud800 lone surrogate"}')
    assert status == 400 and "lone surrogate" in json.loads(body)["error"]["message"]


def test_body_over_the_limit_is_413(http_server, api_key):
    """Refused on the declared length, before the body is read (the server answers and
    closes; a client still sending sees the answer or a reset)."""
    sock = socket.create_connection(("127.0.0.1", http_server.app.http_port), timeout=30)
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sol\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {api_key}\r\nContent-Length: {17 << 20}\r\n\r\n".encode()
                     + b'{"model": "tiny", "messages": [{"role": "user", "content": "xxxx')
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["code"] == "request_too_large"


def test_unknown_route_and_method_in_openai_shape(http_server):
    status, _, body = request(http_server, "GET", "/v2/nothing")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]["message"]
    status, _, body = request(http_server, "GET", "/v1/chat/completions")
    assert status == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_missing_key_is_401(http_server):
    status, _, body = request(http_server, "POST", "/v1/chat/completions",
                              json.dumps({"model": "tiny", "messages": USER}).encode(),
                              {"Content-Type": "application/json"})
    assert status == 401 and "missing API key" in json.loads(body)["error"]["message"]


def test_health_ready_openapi_and_playground(http_server):
    assert request(http_server, "GET", "/health")[:1] == (200,)
    status, _, body = request(http_server, "GET", "/ready")
    assert status == 200 and json.loads(body)["status"] == "serving"
    status, _, body = request(http_server, "GET", "/openapi.json")
    doc = json.loads(body)
    assert status == 200 and {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready"} <= set(
        doc["paths"])
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_completion_tokens", "logit_bias", "top_k", "stream_options"} <= set(chat)
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    status, headers, body = request(http_server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"sol playground" in body
    for asset in ("/playground/app.js", "/playground/style.css"):
        assert request(http_server, "GET", asset)[0] == 200


def test_requests_are_counted_by_protocol(http_server, api_key):
    metrics = http_server.app.metrics.registry

    def count(code: str) -> float:
        return metrics.get_sample_value("sol_requests_total", {"protocol": "http", "model": "tiny",
                                                               "method": "ChatCompletionStream", "code": code}) or 0
    before = count("OK")
    status, _, body = post(http_server, api_key, "/v1/chat/completions",
                           {"model": "tiny", "messages": USER, "max_tokens": 2, "stream": True})
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    wait_for(lambda: count("OK") == before + 1, timeout=10, message="the stream to be counted")   # after its last byte
    post(http_server, api_key, "/v1/chat/completions", {"model": "nope", "messages": USER})
    assert metrics.get_sample_value("sol_requests_total", {"protocol": "http", "model": "", "method": "ChatCompletion",
                                                           "code": "NOT_FOUND"}) >= 1


def _raw_post(server, key: str, payload: dict, request_id: str) -> socket.socket:
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", server.app.http_port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sol\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nIdempotency-Key: {request_id}\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_disconnect_mid_stream_aborts_and_bills_once(http_server, api_key, admin):
    # The untrained model's greedy tokens may be special ones: show them, so chunks flow.
    sock = _raw_post(http_server, api_key, {"model": "tiny", "messages": USER, "max_tokens": 1000, "stream": True,
                                            "ignore_eos": True, "temperature": 0, "skip_special_tokens": False},
                     "http-dropped")
    seen = b""
    while seen.count(b"data: ") < 5:
        seen += sock.recv(65536)
    sock.close()
    wait_for(lambda: engine_idle(http_server), message="the engine to drop the request and free its blocks")
    wait_for(lambda: not http_server.app.service.background, message="background billing")
    with Client(http_server.target, api_key=api_key) as c:
        billed = c.request_usage("http-dropped")
    assert 4 <= billed.completion_tokens < 1000
    metrics = http_server.app.metrics.registry
    assert metrics.get_sample_value("sol_requests_total", {"protocol": "http", "model": "tiny",
                                                           "method": "ChatCompletionStream", "code": "CANCELLED"}) >= 1


def test_disconnect_mid_unary_aborts_and_bills_once(http_server, api_key):
    sock = _raw_post(http_server, api_key, {"model": "tiny", "messages": USER, "max_tokens": 1000,
                                            "ignore_eos": True}, "http-unary-dropped")
    service = http_server.app.service
    wait_for(lambda: any(j.request_id == "http-unary-dropped" and j.output_tokens for j in list(service.inflight.jobs.values())),
             message="the request to generate")
    sock.close()
    wait_for(lambda: engine_idle(http_server), message="the engine to drop the request")
    wait_for(lambda: not service.background and not service.inflight.jobs, message="background billing")
    with Client(http_server.target, api_key=api_key) as c:
        billed = c.request_usage("http-unary-dropped")
    assert 1 <= billed.completion_tokens < 1000


def test_grpc_and_http_streams_share_one_engine_batch(http_server, api_key):
    """Both adapters feed the same engine: a gRPC stream and an HTTP stream run side by side."""
    results = {}

    def over_grpc():
        with Client(http_server.target, api_key=api_key) as c:
            stream = c.chat_stream(USER, model="tiny", max_tokens=40, ignore_eos=True)
            for _ in stream:
                pass
            results["grpc"] = stream.usage.completion_tokens

    t = threading.Thread(target=over_grpc)
    t.start()
    status, _, body = post(http_server, api_key, "/v1/chat/completions",
                           {"model": "tiny", "messages": USER, "max_tokens": 40, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}})
    t.join(60)
    events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    assert status == 200 and events[-1]["usage"]["completion_tokens"] == 40 == results["grpc"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_error_before_the_first_token_is_a_plain_http_error(http_server, api_key, path):
    payload = {"model": "tiny", "stream": True, "temperature": -1}
    payload.update({"messages": USER} if "chat" in path else {"prompt": "hi"})
    status, headers, body = post(http_server, api_key, path, payload)
    assert status == 400 and headers["content-type"] == "application/json"
    assert "temperature must be in [0, 2]" in json.loads(body)["error"]["message"]


def test_stream_connections_send_without_delay(http_server, api_key):
    """TCP_NODELAY on accepted connections: without it Nagle holds each small SSE chunk
    until the client's delayed ACK (~40 ms), and a stream arrives in lumps."""
    import socket as s

    conn = http.client.HTTPConnection("127.0.0.1", http_server.app.http_port, timeout=30)
    conn.request("GET", "/health")
    conn.getresponse().read()
    connections = list(http_server.app.http.server.server_state.connections)
    assert connections
    for protocol in connections:
        sock = protocol.transport.get_extra_info("socket")
        assert sock.getsockopt(s.IPPROTO_TCP, s.TCP_NODELAY)
    conn.close()
