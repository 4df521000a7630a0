"""schemathesis fuzzes the HTTP API from its own OpenAPI document against a real server:
valid and invalid bodies alike must never get a 5xx, and the server keeps serving
afterwards. Bounded: a fixed number of examples per operation, small max_tokens."""

from __future__ import annotations

import itertools

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error


@pytest.fixture(scope="module")
def api_schema(http_server):
    base = f"http://127.0.0.1:{http_server.app.http_port}"
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


def test_no_server_errors(api_schema, api_key):
    # Each operation's own hypothesis run (schemathesis' pytest plugin does the same per
    # operation; its fixture loader does not work with this pytest).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    calls = 0
    for operation, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue        # nothing to get wrong in a GET without parameters
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int) \
                    and case.body["max_tokens"] > 16:
                # Valid requests with a large max_tokens would spend the run generating.
                case.body["max_tokens"] = 16
            nonlocal calls
            calls += 1
            case.call_and_validate(headers={"Authorization": f"Bearer {api_key}"}, checks=[not_a_server_error],
                                   timeout=60)

        fuzz()
    assert calls >= 100


def test_still_serving_after_fuzzing(http_server, api_key):
    c = openai.OpenAI(base_url=http_server.http_url, api_key=api_key, max_retries=0)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "still there?"}], max_tokens=3)
    assert r.usage.completion_tokens > 0
