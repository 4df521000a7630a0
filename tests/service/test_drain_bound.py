"""The drain is bounded by --grace-period, also against clients that read slowly or stop
reading (their streams back-pressured: the server's per-stream buffer full). A real
`sol serve` gets SIGTERM with such streams on gRPC and HTTP; after the grace period
every stream is ended with a final status (gRPC UNAVAILABLE saying the server is
shutting down and to retry; HTTP an SSE error event, then the close) for the clients
that still read, the process exits within grace + DRAIN_BOUND_S, and nothing is logged
at ERROR for the clients that went away."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import grpc
from grpc_health.v1 import health_pb2

from client.client import Client
from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc
from server.app import DRAIN_BOUND_S
from tests.service.harness import wait_for
from tests.service.test_shutdown import ADMIN, readiness, start_serve

GRACE_S = 3.0
SLACK_S = 1.5                # the process's own teardown, on a loaded 2-core box
MAX_TOKENS = 4000
# A client's receive window of ~1 KB: a reader that stops holds the server's writes at once.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


def grpc_stream(target: str, key: str, read_every_s: float | None, outcome: dict) -> None:
    """A stream read one message per `read_every_s` (None: read one, then stop reading)."""
    with grpc.insecure_channel(target, options=SMALL_WINDOW) as ch:
        call = pb_grpc.InferenceStub(ch).ChatCompletionStream(
            pb.ChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="drain")],
                                     params=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)),
            metadata=(("authorization", f"Bearer {key}"),), timeout=120)
        try:
            for n, chunk in enumerate(call):
                outcome["messages"] = n + 1
                if chunk.final:
                    outcome["final"] = True
                if read_every_s is None:
                    outcome["stopped"].wait(120)      # stops reading until the test lets go
                else:
                    time.sleep(read_every_s)
            outcome["status"] = ("OK", "")
        except grpc.RpcError as err:
            outcome["status"] = (err.code().name, err.details() or "")


def http_stream(port: int, key: str, read_every_s: float | None, outcome: dict) -> None:
    """An SSE stream over a socket with a small receive buffer, read 1 KB per
    `read_every_s` (None: read the first bytes, then stop)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "drain"}], "stream": True,
                       "max_tokens": MAX_TOKENS, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sol\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    sock.settimeout(120)
    received = b""
    try:
        while chunk := sock.recv(1024):
            received += chunk
            outcome["bytes"] = len(received)
            if read_every_s is None:
                outcome["stopped"].wait(120)
            else:
                time.sleep(read_every_s)
    except OSError as err:
        outcome["error"] = repr(err)
    finally:
        sock.close()
    outcome["last_event"] = last_sse_event(received)


def last_sse_event(response: bytes) -> str:
    """The last `data:` event of a chunked SSE response (as far as it came)."""
    _, _, rest = response.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep or not size_line.strip():
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size:
            body += rest[:size]
            break
        body, rest = body + rest[:size], rest[size + 2:]
    events = [e[6:] for e in body.decode(errors="replace").split("\n\n") if e.startswith("data: ")]
    return events[-1] if events else ""


def test_drain_ends_back_pressured_streams_within_the_grace_period(tiny_tokenizer, tmp_path):
    served = start_serve(tiny_tokenizer, tmp_path, 4096, "--grace-period", str(GRACE_S), "--stream-buffer-tokens", "4")
    proc, target, http_port = served.proc, served.target, served.http_port
    stopped = threading.Event()
    try:
        wait_for(lambda: readiness(target) == health_pb2.HealthCheckResponse.SERVING, timeout=120,
                 interval=0.1, message="the server to become ready")
        with Client(target, admin_key=ADMIN) as admin:
            key, _ = admin.create_key("drain")
        outcomes = {name: {"stopped": stopped} for name in ("grpc-slow", "grpc-stopped", "http-slow", "http-stopped")}
        threads = [threading.Thread(target=grpc_stream, args=(target, key, 0.02, outcomes["grpc-slow"])),
                   threading.Thread(target=grpc_stream, args=(target, key, None, outcomes["grpc-stopped"])),
                   threading.Thread(target=http_stream, args=(http_port, key, 0.02, outcomes["http-slow"])),
                   threading.Thread(target=http_stream, args=(http_port, key, None, outcomes["http-stopped"]))]
        for t in threads:
            t.start()
        wait_for(lambda: all(o.get("messages") or o.get("bytes") for o in outcomes.values()), timeout=60,
                 message="every stream started")
        time.sleep(1.0)                      # the stopped readers' windows and buffers fill
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=GRACE_S + 60)
        exit_s = time.monotonic() - signalled
        stopped.set()
        for t in threads:
            t.join(30)
        text = served.log.read_text()
        print(f"exit {exit_s:.2f} s after SIGTERM (grace {GRACE_S} s); outcomes {outcomes}")
        print(text[text.find("draining"):][-4000:])
        assert code == 0, text[-3000:]
        assert exit_s <= GRACE_S + DRAIN_BOUND_S + SLACK_S, f"exit took {exit_s:.1f} s\n{text[-3000:]}"
        # The clients that kept reading got the final word: retry elsewhere.
        status, details = outcomes["grpc-slow"]["status"]
        assert status == "UNAVAILABLE" and "shutting down" in details and "retry" in details, outcomes["grpc-slow"]
        last = json.loads(outcomes["http-slow"]["last_event"])
        assert last["error"]["code"] == "unavailable", last
        assert "shutting down" in last["error"]["message"] and "retry" in last["error"]["message"], last
        # A stopped reader cannot read a status behind its own full window; it is cut, not hung.
        assert outcomes["grpc-stopped"]["status"][0] in ("UNAVAILABLE", "CANCELLED"), outcomes["grpc-stopped"]
        errors = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
        assert not errors, "\n".join(errors)
    finally:
        stopped.set()
        if proc.poll() is None:
            proc.kill()
