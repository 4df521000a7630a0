"""One definition per sampling parameter on HTTP too: the OpenAI body's sampling fields
are generated from the engine's SamplingParams, so a field in one and not the other
fails here, and every field set in a body reaches the engine's dataclass."""

from __future__ import annotations

import dataclasses

import pytest

from server.engine.api import ResponseFormat, SamplingParams
from server.http.schemas import GENERATED, OPENAI_SHAPED, ChatCompletionRequest, CompletionRequest

# A value other than the default, within the range, for each generated field.
NON_DEFAULT = {"max_tokens": 7, "min_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "min_p": 0.1,
               "top_n_sigma": 1.5, "seed": 42, "stop_token_ids": [5, 6], "ignore_eos": True,
               "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "n": 2,
               "skip_special_tokens": False}


def test_every_engine_parameter_is_on_the_http_api():
    engine = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(GENERATED) | OPENAI_SHAPED == engine
    assert not set(GENERATED) & OPENAI_SHAPED
    for cls in (ChatCompletionRequest, CompletionRequest):
        assert engine - {"logprobs"} <= set(cls.model_fields), cls


def test_the_test_table_covers_every_generated_field():
    # A new parameter must be given a value here, so the mapping below is exercised for it.
    assert set(NON_DEFAULT) == set(GENERATED)


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_a_field_set_in_the_body_reaches_the_engine(name):
    value = NON_DEFAULT[name]
    assert getattr(SamplingParams(), name) != value
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **{name: value})
    params = body.sampling(0)
    assert getattr(params, name) == value
    params.validate(vocab_size=100)
    # Everything else keeps its default.
    others = {f.name for f in dataclasses.fields(SamplingParams)} - {name}
    assert all(getattr(params, o) == getattr(SamplingParams(), o) for o in others)


def test_openai_shaped_fields_map_onto_the_engine():
    body = CompletionRequest(model="m", prompt="x", stop="###", logit_bias={"7": -100}, logprobs=3,
                             response_format={"type": "regex", "regex": "a+"})
    params = body.sampling(body.top_n()[0])
    assert params.stop == ["###"] and params.logit_bias == {7: -100.0} and params.logprobs == 3
    assert params.response_format == ResponseFormat("regex", regex="a+")


def test_unset_max_tokens_stays_unset_and_max_completion_tokens_wins():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert body.sampling(0).max_tokens is None
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=9,
                                 max_completion_tokens=4)
    assert body.sampling(0).max_tokens == 4


def test_descriptions_carry_the_ranges_and_name_extensions():
    props = ChatCompletionRequest.model_json_schema()["properties"]
    assert props["temperature"]["description"].startswith("[0, 2]")
    assert props["top_p"]["description"].startswith("(0, 1]")
    assert props["top_k"]["description"].startswith("extension: >= 0")
    assert props["max_tokens"]["anyOf"][0]["maximum"] == 2**31 - 1        # int32, as the proto
    assert props["seed"]["anyOf"][0]["maximum"] == 2**63 - 1              # int64, as the proto
