"""Slow and idle HTTP clients cannot hold connections: raw sockets that send nothing,
half a header block (a byte now and then), or headers and half a body are answered 408
and closed after the stated deadline; an idle keep-alive is closed after its timeout;
and 200 such connections do not keep a normal client out."""

from __future__ import annotations

import http.client
import socket
import time

import pytest

from server.config import ServerConfig
from tests.conftest import free_port
from tests.service.harness import RunningServer

HEADER_S, BODY_S, KEEPALIVE_S = 1.0, 1.5, 1.0
SLACK_S = 1.0          # scheduling on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(tiny_tokenizer, tmp_path_factory):
    from gpt.registry import Registry, publish_checkpoint
    from tests.conftest import make_tiny_model

    root = tmp_path_factory.mktemp("timeouts")
    registry = Registry(root / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer), tiny_tokenizer, {"stage": "base"})
    s = RunningServer(registry.root, root / "home", http_port=free_port(), http_header_timeout_s=HEADER_S,
                      http_body_timeout_s=BODY_S, http_keepalive_timeout_s=KEEPALIVE_S).start()
    yield s
    s.stop()


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.app.http_port), timeout=10)
    sock.settimeout(0.1)
    return sock


def wait_closed(sock: socket.socket, limit_s: float, trickle: bytes = b"") -> tuple[float, bytes]:
    """Read until the server closes; send `trickle` a byte at a time every 0.3 s meanwhile.
    Returns (seconds until closed, what was received)."""
    started = time.monotonic()
    received = b""
    next_send = started + 0.3
    while time.monotonic() - started < limit_s:
        if trickle and time.monotonic() >= next_send:
            try:
                sock.sendall(trickle[:1])
            except OSError:
                break
            trickle, next_send = trickle[1:], next_send + 0.3
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    else:
        raise AssertionError(f"the server held the connection for over {limit_s} s (received {received!r})")
    return time.monotonic() - started, received


def test_a_connection_that_sends_nothing_is_closed(server):
    with connect(server) as sock:
        took, _ = wait_closed(sock, HEADER_S + SLACK_S + 2)
    assert HEADER_S - 0.2 <= took <= HEADER_S + SLACK_S


def test_half_a_header_block_trickled_is_closed_at_the_header_deadline(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sol\r\n")
        # A byte every 0.3 s does not extend the deadline (slowloris).
        took, received = wait_closed(sock, HEADER_S + SLACK_S + 2, trickle=b"X-Slow: " + b"a" * 40)
    assert took <= HEADER_S + SLACK_S
    assert received.startswith(b"HTTP/1.1 408 ") and b"request headers not received within 1 s" in received


def test_half_a_body_is_closed_at_the_body_deadline(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sol\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{\"model\": \"tiny\",")
        took, received = wait_closed(sock, BODY_S + SLACK_S + 2, trickle=b" " * 40)
    assert took <= BODY_S + SLACK_S
    assert received.startswith(b"HTTP/1.1 408 ") and b"request body not received within 1.5 s" in received


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /ready HTTP/1.1\r\nHost: sol\r\n\r\n")
        took, received = wait_closed(sock, KEEPALIVE_S + SLACK_S + 2)
    assert received.startswith(b"HTTP/1.1 200 ")
    assert took <= KEEPALIVE_S + SLACK_S


def test_a_keep_alive_connection_serves_its_next_request_and_times_its_headers(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.app.http_port, timeout=10)
    for _ in range(3):                  # well inside the deadlines: served on one connection
        conn.request("GET", "/ready")
        assert conn.getresponse().read() and conn.sock is not None
    sock = conn.sock
    sock.settimeout(0.1)
    sock.sendall(b"GET /ready HTTP/1.1\r\n")       # the next request's headers never end
    took, received = wait_closed(sock, HEADER_S + SLACK_S + 2)
    assert took <= HEADER_S + SLACK_S and received.startswith(b"HTTP/1.1 408 ")
    conn.close()


def test_two_hundred_idle_connections_do_not_stop_a_normal_client(server):
    idle = [connect(server) for _ in range(200)]
    try:
        for i, sock in enumerate(idle):
            if i % 2:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: sol\r\n")     # half of them half a request
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", server.app.http_port, timeout=10)
        conn.request("GET", "/ready")
        assert conn.getresponse().status == 200
        conn.close()
        assert time.monotonic() - started < 2.0
        # And every one of them is closed by the header deadline.
        deadline = time.monotonic() + HEADER_S + SLACK_S + 3
        for sock in idle:
            wait_closed(sock, max(0.1, deadline - time.monotonic()))
    finally:
        for sock in idle:
            sock.close()


def test_timeouts_are_settings_with_flags_and_environment(monkeypatch):
    monkeypatch.setenv("SOL_HTTP_HEADER_TIMEOUT", "2.5")
    config = ServerConfig(http_body_timeout_s=7.0)
    assert (config.http_header_timeout_s, config.http_body_timeout_s, config.http_keepalive_timeout_s) == \
        (2.5, 7.0, 30.0)
    with pytest.raises(ValueError, match="http_body_timeout_s must be positive"):
        ServerConfig(http_body_timeout_s=0)
