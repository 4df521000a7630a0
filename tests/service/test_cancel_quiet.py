"""A client cancelling a stream is ordinary: every way a client can drop a stream (close
mid-stream, stop reading and close the channel, cancel the call at any moment, run out its
deadline) is counted as CANCELLED and logs nothing at WARNING or above, in particular no
traceback (grpc's ExecuteBatchError from a write to a gone client, a task exception never
retrieved, the servicer's 'internal error')."""

from __future__ import annotations

import gc
import logging
import random
import threading

import grpc
import pytest

from client.client import Client
from client.types import SolError
from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny, wait_for

MSG = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture
def server(tiny_tokenizer, tmp_path):
    s = RunningServer(publish_tiny(tmp_path, tiny_tokenizer, max_seq_len=2048), tmp_path / "home").start()
    yield s
    s.stop()


def cancelled(server) -> float:
    return server.app.metrics.registry.get_sample_value(
        "sol_requests_total", {"protocol": "grpc", "model": "tiny", "method": "ChatCompletionStream", "code": "CANCELLED"}) or 0.0


def test_client_cancels_log_no_error(server, caplog):
    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        key = admin.create_key("cancel")[0]
    md = (("authorization", f"Bearer {key}"),)
    rng = random.Random(0)
    expected = 0

    def request(max_tokens: int = 1800, **params) -> pb.ChatCompletionRequest:
        return pb.ChatCompletionRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="hi")],
                                        params=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))

    with caplog.at_level(logging.DEBUG):
        with Client(server.target, api_key=key) as c:
            for i in range(6):                        # close() after a few chunks
                stream = c.chat_stream(MSG, model="tiny", max_tokens=1800, ignore_eos=True, n=1 + i % 3)
                with pytest.raises(SolError):
                    for seen, _ in enumerate(stream):
                        if seen == i % 4:
                            stream.close()
                expected += 1
        for _ in range(3):                             # stop reading, then the channel goes away
            with Client(server.target, api_key=key) as c:
                next(iter(c.chat_stream(MSG, model="tiny", max_tokens=1800, ignore_eos=True, logprobs=5)))
            expected += 1
        with grpc.insecure_channel(server.target) as ch:
            stub = sol_pb2_grpc.InferenceStub(ch)
            for _ in range(12):                       # cancel at any moment, before or during the stream
                call = stub.ChatCompletionStream(request(n=rng.randint(1, 4), logprobs=rng.randint(0, 20)),
                                                 metadata=md)
                timer = threading.Timer(rng.random() * 0.15, call.cancel)
                timer.start()
                with pytest.raises(grpc.RpcError):
                    for _ in call:
                        pass
                timer.join()
            for i in range(4):                        # a deadline that runs out mid-stream
                with pytest.raises(grpc.RpcError) as info:
                    for _ in stub.ChatCompletionStream(request(), metadata=md, timeout=0.05 * (i + 1)):
                        pass
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Everything dropped has left the engine; a stream the server never saw (cancelled
        # before it arrived) is not counted, so the raw cancels give at least 0 each.
        wait_for(lambda: not server.app.service.inflight.jobs and not server.app.service.background,
                 message="every cancelled request to leave and be billed")
        gc.collect()                                  # finalizers of dropped generators log, if anything does
        server.call(_tick())
    wait_for(lambda: cancelled(server) >= expected, timeout=10, message=f"{expected} streams counted as CANCELLED")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [(r.levelname, r.name, r.getMessage()[:200]) for r in loud]


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.2)
