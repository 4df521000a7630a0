"""The real `openai` SDK (sync, async, streaming) against a real sol server's HTTP API:
answers, usage, aliases, base-model completions, and each refusal as the SDK's own
exception class, with the same messages gRPC callers get."""

from __future__ import annotations

import asyncio

import openai
import pytest

from client.client import Client
from client.types import SolError

USER = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def client(http_server, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_server.http_url, api_key=api_key, max_retries=0)


def test_chat_returns_text_usage_and_cost(client, http_server, api_key):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
    (choice,) = r.choices
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0
    assert r.model == "tiny@2" and r.object == "chat.completion"
    sol = r.model_extra["sol"]
    assert sol["version"] == 2 and sol["request_id"] == r.id
    expected_cost = ((u.prompt_tokens - u.prompt_tokens_details.cached_tokens) * 1.0
                     + u.prompt_tokens_details.cached_tokens * 0.5 + u.completion_tokens * 2.0) / 1000
    assert sol["cost"] == pytest.approx(expected_cost)
    # The gRPC API sees the same request in the same ledger.
    with Client(http_server.target, api_key=api_key) as c:
        billed = c.request_usage(r.id)
    assert (billed.prompt_tokens, billed.completion_tokens) == (u.prompt_tokens, u.completion_tokens)


def test_max_completion_tokens_and_vllm_extensions(client):
    r = client.chat.completions.create(model="tiny:sft", messages=USER, max_completion_tokens=5, temperature=0.8,
                                       extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1,
                                                   "ignore_eos": True, "min_tokens": 5, "stop_token_ids": [0]})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_streaming_yields_deltas_and_a_final_usage_chunk(client):
    unary = client.chat.completions.create(model="tiny:base", messages=USER, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="tiny:base", messages=USER, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    *deltas, last = chunks
    assert deltas and all(len(c.choices) == 1 for c in deltas)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == unary.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens
    assert last.model_extra["sol"]["cost"] > 0
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "tiny@1"


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)


def test_n_logprobs_stop_seed(client):
    kwargs = dict(model="tiny", messages=USER, max_tokens=6, n=2, logprobs=True, top_logprobs=3, seed=7,
                  stop=["\n\n", "zz"], presence_penalty=0.5, frequency_penalty=0.5, user="end-user-1")
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]   # seeded
    for choice in a.choices:
        tokens = choice.logprobs.content
        assert tokens and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in tokens)
        assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in tokens)
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)


def test_logit_bias_forces_a_token(client, http_server):
    (model,) = [m for m in http_server.app.models.models() if m.version == 2]
    token = model.tokenizer.encode(" the")[0]
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, logit_bias={str(token): 100},
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == " the" * 4


def test_models_list_has_versions_and_aliases(client):
    models = {m.id: m for m in client.models.list()}
    assert {"tiny", "tiny:latest", "tiny:sft", "tiny:base", "tiny@1", "tiny@2"} <= set(models)
    assert models["tiny:base"].model_extra["root"] == "tiny@1"
    assert models["tiny"].model_extra["root"] == "tiny@2"
    assert all(m.owned_by == "sol" and m.object == "model" for m in models.values())


def test_completions_on_a_base_model(client):
    r = client.completions.create(model="tiny:base", prompt="Once upon a time", max_tokens=6, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    (choice,) = r.choices
    assert r.object == "text_completion" and r.model == "tiny@1"
    assert len(choice.logprobs.tokens) == 6 and "".join(choice.logprobs.tokens) == choice.text
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert r.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="tiny:base", prompt="Once upon a time", max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 6


def test_async_client(http_server, api_key):
    async def main():
        async with openai.AsyncOpenAI(base_url=http_server.http_url, api_key=api_key, max_retries=0) as c:
            answers = await asyncio.gather(*(c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=5)
                for i in range(4)))
            stream = await c.chat.completions.create(model="tiny", messages=USER, max_tokens=5, stream=True,
                                                     stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            return answers, chunks

    answers, chunks = asyncio.run(main())
    assert len({a.id for a in answers}) == 4 and all(a.usage.completion_tokens > 0 for a in answers)
    assert chunks[-1].usage is not None and chunks[-1].choices == []


# --- refusals ---------------------------------------------------------------------------
def test_bad_key_is_an_authentication_error(http_server):
    c = openai.OpenAI(base_url=http_server.http_url, api_key="sk-sol-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        c.chat.completions.create(model="tiny", messages=USER)
    assert "unknown API key" in err.value.message
    assert err.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=USER)
    assert "available: tiny@1" in err.value.message and err.value.body["code"] == "not_found"


def test_bad_parameters_are_bad_requests_with_the_grpc_message(client, http_server, api_key):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=USER, temperature=9)
    with Client(http_server.target, api_key=api_key) as c, pytest.raises(SolError) as grpc_err:
        c.chat(USER, model="tiny", temperature=9)
    assert err.value.body["message"] == grpc_err.value.message == "temperature must be in [0, 2] (got 9.0)"
    for bad in ({"max_tokens": 100_000}, {"n": 99}, {"messages": []}, {"top_logprobs": 2},
                {"messages": [{"role": "wizard", "content": "hi"}]}, {"logit_bias": {"x": 1}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{"model": "tiny", "messages": USER, **bad})
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=USER, extra_body={"top_k": "many"})
    assert err.value.body["param"] == "top_k"


def test_spent_budget_is_a_rate_limit_error(http_server, admin):
    key, _ = admin.create_key("tight", token_budget=60)
    c = openai.OpenAI(base_url=http_server.http_url, api_key=key, max_retries=0)
    c.chat.completions.create(model="tiny", messages=USER, max_tokens=20, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=20)
    assert err.value.body["type"] == "rate_limit_error" and "budget" in err.value.message
    assert err.value.response.headers["x-should-retry"] == "false"      # waiting does not refill a budget


def test_rate_limit_says_when_to_retry(http_server, admin):
    key, _ = admin.create_key("rpm", rpm=1)
    c = openai.OpenAI(base_url=http_server.http_url, api_key=key, max_retries=0)
    c.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    headers = err.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60 and int(headers["retry-after-ms"]) > 0


def test_idempotency_key_bills_once(client, http_server, api_key):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3,
                                       extra_headers={"Idempotency-Key": "http-idem-1"})
    assert r.id == "http-idem-1"
    with pytest.raises(openai.ConflictError) as err:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=3,
                                       extra_headers={"Idempotency-Key": "http-idem-1"})
    assert "already served and billed" in err.value.message
    r2 = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3,
                                        extra_headers={"X-Request-Id": "http-idem-2"})
    assert r2.id == "http-idem-2"
    with Client(http_server.target, api_key=api_key) as c:
        assert c.request_usage("http-idem-1").completion_tokens == r.usage.completion_tokens
