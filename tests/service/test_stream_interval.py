"""`stream_interval`: a stream's messages carry that many tokens (the first token and the
end come at once), the text and the usage are those of a per-token stream, and stop
strings still cut the output where they are found. Unary calls answer the same."""

from __future__ import annotations

import pytest

from client.client import Client
from server.config import ServerConfig
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny

INTERVAL = 4
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def servers(tiny_tokenizer, tmp_path_factory):
    """Two servers on the same weights: per-token streaming, and every INTERVAL tokens."""
    root = tmp_path_factory.mktemp("interval")
    registry = publish_tiny(root, tiny_tokenizer)
    running = {}
    for interval in (1, INTERVAL):
        server = RunningServer(registry, root / f"home-{interval}", stream_interval=interval).start()
        with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
            server.key, _ = admin.create_key("interval")
        running[interval] = server
    yield running
    for server in running.values():
        server.stop()


def stream(server, **params):
    with Client(server.target, api_key=server.key, retries=0) as client:
        s = client.complete_stream(PROMPT, model="tiny", temperature=0.0, **params)
        chunks = list(s)
        return [len(t) for t in ([i for d in c.deltas for i in d.token_ids] for c in chunks) if t], s.text, s.usage


def test_messages_carry_the_interval_and_the_output_is_the_same(servers):
    sizes_1, text_1, usage_1 = stream(servers[1], max_tokens=30, ignore_eos=True)
    sizes, text, usage = stream(servers[INTERVAL], max_tokens=30, ignore_eos=True)
    # Message sizes depend on how far the reader lags (it takes all it may at once), so
    # only the bounds are certain: after the first, no message holds fewer than INTERVAL
    # tokens but the last.
    assert sum(sizes_1) == 30 and sum(sizes) == 30
    assert all(n >= INTERVAL for n in sizes[1:-1])
    assert len(sizes) <= 2 + 29 // INTERVAL
    assert (text, usage.completion_tokens, usage.prompt_tokens) == (text_1, 30, usage_1.prompt_tokens)


def test_a_stop_string_still_cuts_the_output_where_it_is_found(servers):
    _, free_text, _ = stream(servers[1], max_tokens=30, ignore_eos=True)
    stop = free_text[len(free_text) // 2:len(free_text) // 2 + 3]
    assert stop.strip(), "the tiny model's text has no usable stop string here"
    want = stream(servers[1], max_tokens=30, ignore_eos=True, stop=[stop])
    got = stream(servers[INTERVAL], max_tokens=30, ignore_eos=True, stop=[stop])
    assert got[1] == want[1] == free_text[:free_text.index(stop)]
    assert got[2].completion_tokens == want[2].completion_tokens < 30


def test_unary_calls_answer_the_same_whatever_the_interval(servers):
    answers = []
    for server in servers.values():
        with Client(server.target, api_key=server.key, retries=0) as client:
            c = client.complete(PROMPT, model="tiny", temperature=0.0, max_tokens=25, ignore_eos=True)
            answers.append((c.text, c.usage.completion_tokens))
    assert answers[0] == answers[1] and answers[0][1] == 25


@pytest.mark.parametrize("interval, buffer", [(0, 32), (33, 32)])
def test_an_interval_outside_one_to_the_stream_buffer_is_refused(interval, buffer):
    with pytest.raises(ValueError, match="stream_interval"):
        ServerConfig(stream_interval=interval, stream_buffer_tokens=buffer)
