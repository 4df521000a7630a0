"""Chat and completion over real gRPC on loopback: text, exact usage, prefix caching."""

from __future__ import annotations

import grpc
import pytest

from client.client import Client
from client.types import SolError
from gpt.chat import chat_prompt_ids
from tests.service.harness import ADMIN_KEY, RunningServer, wait_for


@pytest.fixture
def server(tiny_checkpoint, tmp_path):
    registry, _ = tiny_checkpoint
    s = RunningServer(registry.root, tmp_path / "home").start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        key, _ = admin.create_key("tests")
    with Client(server.target, api_key=key, admin_key=ADMIN_KEY) as c:
        yield c


MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def test_unary_chat_exact_usage(client, tiny_tokenizer):
    r = client.chat(MESSAGES, model="tiny", max_tokens=12, temperature=0)
    assert r.model == "tiny" and r.version == 1 and r.id
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tiny_tokenizer, MESSAGES))
    assert r.usage.completion_tokens == r.choices[0].completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    assert client.count_tokens("tiny", messages=MESSAGES) == r.usage.prompt_tokens


def test_stream_matches_unary_and_ends_with_usage(client, tiny_tokenizer):
    whole = client.chat(MESSAGES, model="tiny:base", max_tokens=16, temperature=0, ignore_eos=True)
    stream = client.chat_stream(MESSAGES, model="tiny@1", max_tokens=16, temperature=0, ignore_eos=True)
    chunks = list(stream)
    assert chunks[-1].final and chunks[-1].usage is not None
    assert all(not c.final for c in chunks[:-1])
    assert stream.text == whole.text
    assert stream.usage.completion_tokens == sum(len(d.token_ids) for c in chunks for d in c.deltas) == 16
    assert stream.usage.prompt_tokens == len(chat_prompt_ids(tiny_tokenizer, MESSAGES))
    assert stream.finish_reasons == {0: "length"}


def test_repeated_long_system_prompt_is_cached(client):
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    first = client.chat([system, {"role": "user", "content": "one"}], model="tiny", max_tokens=2, temperature=0)
    second = client.chat([system, {"role": "user", "content": "two"}], model="tiny", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 64
    assert second.usage.cached_tokens > 0
    assert second.usage.cached_tokens <= second.usage.prompt_tokens


def test_completion_and_n_choices(client, tiny_tokenizer):
    r = client.complete("Once upon a time", model="tiny", max_tokens=5, n=3, temperature=1.0, seed=1,
                        ignore_eos=True)
    assert len(r.choices) == 3
    assert r.usage.prompt_tokens == len(tiny_tokenizer.encode("Once upon a time"))
    assert r.usage.completion_tokens == 15


def test_graceful_cancel_delivers_usage_and_bills_it(client, server):
    stream = client.chat_stream(MESSAGES, model="tiny", max_tokens=200, ignore_eos=True)
    got = 0
    cancelled = False
    for chunk in stream:
        got += sum(len(d.token_ids) for d in chunk.deltas)
        if got >= 3 and not chunk.final and not cancelled:
            # Once: tokens already on their way still arrive before the final chunk, and a
            # second cancel of the same request rightly answers False.
            assert stream.cancel()
            cancelled = True
    assert stream.finish_reasons[0] == "abort"
    assert 3 <= stream.usage.completion_tokens < 200
    assert stream.usage.completion_tokens == got
    report = wait_for(lambda: (r := client.usage()).total.requests == 1 and r, message="ledger")
    assert report.total.completion_tokens == got


def test_idempotent_request_id(client):
    client.chat(MESSAGES, model="tiny", max_tokens=2, request_id="order-42")
    with pytest.raises(SolError) as err:
        client.chat(MESSAGES, model="tiny", max_tokens=2, request_id="order-42")
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and "already served" in err.value.message
    assert client.usage().total.requests == 1


def test_list_models(client):
    (m,) = client.list_models()
    assert (m.name, m.version, m.stage) == ("tiny", 1, "base")
    assert set(m.aliases) >= {"base", "latest"}


def test_list_models_shows_lineage_and_eval_metrics(client, tiny_checkpoint, tiny_model, tiny_tokenizer):
    from gpt.registry import publish_checkpoint

    registry, _ = tiny_checkpoint
    publish_checkpoint(registry, "tiny", tiny_model, tiny_tokenizer,
                       {"stage": "sft", "parent": "tiny@1",
                        "metrics": {"tasks": {"accuracy": 0.5, "per_family": {"add": 1.0}}, "curve": [1, 2]}},
                       aliases=("sft",))
    loaded = client.load_model("tiny:sft")
    assert (loaded.version, loaded.stage, loaded.parent) == (2, "sft", "tiny@1")
    assert loaded.eval_metrics == {"tasks.accuracy": 0.5, "tasks.per_family.add": 1.0}
    assert {m.version: bool(m.loaded_at) for m in client.list_models()} == {1: True, 2: True}


def test_logprobs_and_stop_strings(client):
    r = client.chat(MESSAGES, model="tiny", max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    lps = r.choices[0].logprobs
    assert len(lps) == 6 and all(len(lp.top) == 2 and lp.logprob <= 0 for lp in lps)
    # The untrained model says mostly special tokens: show them, so stop strings can cut them.
    text = client.chat(MESSAGES, model="tiny", max_tokens=24, temperature=0, ignore_eos=True,
                       skip_special_tokens=False).text
    # A two-character piece of the greedy answer, from its second half where possible.
    starts = sorted(range(len(text) - 1), key=lambda i: (i < len(text) // 2, i))
    stop = next(text[i:i + 2] for i in starts if text[i:i + 2].strip())
    cut = client.chat(MESSAGES, model="tiny", max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                      skip_special_tokens=False)
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.text and text.startswith(cut.text)


def test_completion_stream(client, tiny_tokenizer):
    stream = client.complete_stream("Once upon a time", model="tiny", max_tokens=7, ignore_eos=True, seed=3)
    chunks = list(stream)
    assert chunks[-1].final and stream.usage.completion_tokens == 7
    assert stream.usage.prompt_tokens == len(tiny_tokenizer.encode("Once upon a time"))
    again = client.complete("Once upon a time", model="tiny", max_tokens=7, ignore_eos=True, seed=3)
    assert again.text == stream.text                 # a seed reproduces the sample
