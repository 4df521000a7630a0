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
WINDOW = 1024           # the client's HTTP/2 window, bytes
GRPC_FRAME = 5          # gRPC's length prefix on every message
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


def generated(server) -> dict[str, int]:
    """Tokens the engine has generated for each request in flight, by API request id."""
    (model,) = server.app.models.models()
    engine_ids = {job.stream.request_id: job.request_id for job in list(server.app.service.inflight.jobs.values())}
    return {engine_ids[request_id]: sum(s.num_output_tokens for s in state.sequences)
            for request_id, state in list(model.engine._requests.items())}


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


def in_transit_allowance(chunks: list[tuple[int, int]]) -> int:
    """Tokens that may sit between the engine and an unread client: those in the messages
    that fit the client's window (the first ones it reads once it reads again), one message
    grpc's core has taken beyond the window, and the servicer's one pending message. How
    many tokens a message holds depends on how far the reader fell behind (the server
    coalesces what is ready into one message), so the allowance is counted from the
    messages actually sent, not assumed at one token each. chunks: (bytes, tokens) in
    the order the client read them."""
    held, used, index = 0, 0, 0
    while index < len(chunks) and used + chunks[index][0] + GRPC_FRAME <= WINDOW:
        used += chunks[index][0] + GRPC_FRAME
        held += chunks[index][1]
        index += 1
    return held + sum(tokens for _, tokens in chunks[index:index + 2])


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
        time.sleep(1.0)
        assert generated(server) == made, "paused streams went on generating"
        print("generated per unread stream: max", max(made.values()), "mean", sum(made.values()) / len(made))
        grown = rss_mib() - before
        assert grown < 150, f"server memory grew {grown:.0f} MiB with {STREAMS} unread streams"
        # Reading again resumes every stream; each ends with all its tokens and exact usage,
        # and the engine was never further ahead of it than the bound plus what was in transit.
        for i, call in enumerate(calls):
            ahead = made[f"slow-{i}"]
            tokens, usage, chunks = 0, None, []
            for chunk in call:
                count = sum(len(c.token_ids) for c in chunk.choices)
                chunks.append((chunk.ByteSize(), count))
                tokens += count
                if chunk.final:
                    usage = chunk.usage
            assert tokens == MAX_TOKENS and usage.completion_tokens == MAX_TOKENS
            allowance = in_transit_allowance(chunks)
            assert ahead <= BOUND + allowance, (ahead, BOUND, allowance, chunks[:12])
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
            made = generated(server)
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
        for request_id, tokens in made.items():
            usage = c.request_usage(request_id)
            assert 1 <= usage.completion_tokens == tokens < MAX_TOKENS, (request_id, usage.completion_tokens, tokens)
