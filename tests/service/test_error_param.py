"""Every refusal of SamplingParams.validate names its field as OpenAI's error `param`:
one bad field at a time, each limit in turn, must map to that field (and several bad
fields to none), so a new limit whose message names no field fails here."""

from __future__ import annotations

import pytest

from server import validation
from server.engine.api import JsonSchema, ResponseFormat, SamplingParams
from server.errors import ServiceError

VOCAB = 100
ONE_BAD_FIELD = [
    ("max_tokens", {"max_tokens": 0}),
    ("min_tokens", {"min_tokens": 10, "max_tokens": 5}),
    ("temperature", {"temperature": 2.5}),
    ("top_p", {"top_p": 0.0}),
    ("top_k", {"top_k": -1}),
    ("min_p", {"min_p": 1.0}),
    ("presence_penalty", {"presence_penalty": 3.0}),
    ("frequency_penalty", {"frequency_penalty": -3.0}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("logprobs", {"logprobs": 21}),
    ("n", {"n": 9}),
    ("stop", {"stop": ["x"] * 9}),
    ("stop", {"stop": [""]}),
    ("stop_token_ids", {"stop_token_ids": list(range(17))}),
    ("stop_token_ids", {"stop_token_ids": [VOCAB]}),
    ("logit_bias", {"logit_bias": {i: 1.0 for i in range(301)}}),
    ("logit_bias", {"logit_bias": {1: 101.0}}),
    ("logit_bias", {"logit_bias": {VOCAB + 1: 1.0}}),
    ("response_format.type", {"response_format": ResponseFormat("yaml")}),
    ("response_format", {"response_format": ResponseFormat("regex")}),
    ("response_format.json_schema.name", {"response_format": ResponseFormat(
        "json_schema", JsonSchema(name="no spaces allowed", schema={"type": "object"}))}),
    ("response_format.json_schema.schema", {"response_format": ResponseFormat(
        "json_schema", JsonSchema(schema="{not json"))}),
]


@pytest.mark.parametrize(("param", "values"), ONE_BAD_FIELD, ids=[f"{p}-{i}" for i, (p, _) in enumerate(ONE_BAD_FIELD)])
def test_one_bad_field_is_the_param(param, values):
    with pytest.raises(ServiceError) as info:
        validation.check(SamplingParams(**values), VOCAB)
    assert info.value.param == param, info.value.message


def test_several_bad_fields_name_none():
    with pytest.raises(ServiceError) as info:
        validation.check(SamplingParams(temperature=5.0, top_p=5.0), VOCAB)
    assert info.value.param is None
    assert "temperature" in info.value.message and "top_p" in info.value.message


def test_request_checks_name_their_field():
    with pytest.raises(ServiceError) as info:
        validation.fit_context(SamplingParams(max_tokens=100), 50, 64, 16)
    assert info.value.param == "max_tokens"
    with pytest.raises(ServiceError) as info:
        validation.fit_context(SamplingParams(), 64, 64, 16, prompt_field="prompt")
    assert info.value.param == "prompt"
