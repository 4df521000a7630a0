"""Structured outputs through the real openai SDK: OpenAI's `response_format`
(json_object, json_schema with strict) and sol's regex extension constrain the answer;
an invalid schema is a BadRequestError naming the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

USER = [{"role": "user", "content": "Describe a point."}]
SCHEMA = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["x", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(http_server, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_server.http_url, api_key=api_key, max_retries=0)


def test_json_schema_outputs_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "point", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=40, temperature=1.0, seed=3, n=4,
                                       response_format=fmt)
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    assert finished
    for c in finished:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_and_the_regex_extension(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model="tiny:base", prompt="Code:", max_tokens=12, temperature=1.0, seed=1,
                                  extra_body={"response_format": {"type": "regex", "regex": "[A-Z]{3}-[0-9]{2}"}})
    assert r.choices[0].finish_reason == "stop"
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", r.choices[0].text)


def test_an_invalid_schema_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "not": {}}}})
    assert "not" in str(info.value)
