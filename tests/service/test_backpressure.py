"""Backpressure: a client that stops reading stops its generation. The engine runs at
most the stream bound (plus what the HTTP/2 window holds) ahead of the reader, the
server's memory stays flat with hundreds of such streams, reading again completes every
stream with exact usage, and a cancel bills what was generated, not max_tokens."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from client.client import Client
from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc
from tests.service.harness import ADMIN_KEY, RunningServer, wait_for

BOUND = 16              # the server's stream_buffer_tokens
MAX_TOKENS = 120
STREAMS = 200
# A small HTTP/2 window and no window growth: a client that does not read fills it fast.
SLOW_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0),
               ("grpc.max_concurrent_streams", 1000)]


@pytest.fixture
def server(tiny_tokenizer, tmp_path):
    from gpt.registry import Registry, publish_checkpoint
    from tests.conftest import make_tiny_model

    registry = Registry(tmp_path / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer, max_seq_len=512), tiny_tokenizer,
                       {"stage": "base"})
    s = RunningServer(registry.root, tmp_path / "home", stream_buffer_tokens=BOUND).start()
    yield s
    s.stop()


def generated(server) -> list[int]:
    """Tokens the engine has generated for each request in flight."""
    (model,) = server.app.models.models()
    return [sum(s.num_output_tokens for s in state.sequences)
            for state in list(model.engine._requests.values())]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def open_streams(server, key: str, prefix: str, n: int):
    channel = grpc.insecure_channel(server.target, options=SLOW_READER)
    stub = pb_grpc.InferenceStub(channel)
    md = (("authorization", f"Bearer {key}"),)
    calls = [stub.ChatCompletionStream(pb.ChatCompletionRequest(
        model="tiny", messages=[pb.ChatMessage(role="user", content=f"story {i}")], request_id=f"{prefix}{i}",
        params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)), metadata=md)
        for i in range(n)]
    return channel, calls


def test_never_reading_clients_stop_the_engine_and_complete_when_they_read(server):
    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        key = admin.create_key("slow")[0]
    (model,) = server.app.models.models()
    before = rss_mib()
    channel, calls = open_streams(server, key, "slow-", STREAMS)
    try:
        wait_for(lambda: model.engine.stats().paused == STREAMS, timeout=120, message="every stream to pause")
        time.sleep(2.0)
        made = generated(server)
        assert len(made) == STREAMS
        # The bound plus what the 1 KiB window and the servicer's one pending message hold.
        print("generated per unread stream: max", max(made), "mean", sum(made) / len(made))
        assert max(made) <= BOUND + 48, max(made)
        grown = rss_mib() - before
        assert grown < 150, f"server memory grew {grown:.0f} MiB with {STREAMS} unread streams"
        # Reading again resumes every stream; each ends with all its tokens and exact usage.
        for call in calls:
            tokens, usage = 0, None
            for chunk in call:
                tokens += sum(len(c.token_ids) for c in chunk.choices)
                if chunk.final:
                    usage = chunk.usage
            assert tokens == MAX_TOKENS and usage.completion_tokens == MAX_TOKENS
    finally:
        channel.close()
    wait_for(lambda: model.engine.stats().running == 0 and model.engine.stats().paused == 0, message="idle")


def test_cancelling_unread_streams_bills_what_was_generated(server, caplog):
    """...and logs nothing at ERROR: a write waiting on a full window fails in grpc's core
    when the client cancels, which grpc logged as an ExecuteBatchError traceback for
    every such stream (server/grpc/wire.py)."""
    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        key = admin.create_key("cancel")[0]
    (model,) = server.app.models.models()
    channel, calls = open_streams(server, key, "gone-", 20)
    with caplog.at_level(logging.DEBUG):
        try:
            wait_for(lambda: model.engine.stats().paused == 20, timeout=60, message="streams to pause")
            made = [f"gone-{i}" for i in range(20)]
            for call in calls:
                call.cancel()
        finally:
            channel.close()
        wait_for(lambda: not server.app.service.inflight.jobs and not server.app.service.background,
                 message="cancelled requests billed")
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not loud, [(r.name, r.getMessage()[:120]) for r in loud]
    st = model.engine.stats()
    assert st.running == 0 and st.waiting == 0 and st.paused == 0 and st.kv_blocks_used == 0
    with Client(server.target, api_key=key) as c:
        for request_id in made:
            usage = c.request_usage(request_id)
            assert 1 <= usage.completion_tokens <= BOUND + 48, (request_id, usage.completion_tokens)
