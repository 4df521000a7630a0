"""Tool calling through the real `openai` SDK against a real sol server (the tiny sol
model, random weights, sol's own layout with its tools section and Hermes calls):
tool_choice required / named is enforced, so calls come back whose arguments validate
against the tool's schema, every time; the matrix of tool_choice x stream; parallel
calls; a tool-role round trip rendered into the prompt; and each bad combination a 400
naming its parameter."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from gpt.chat import Message, chat_prompt_ids
from gpt.tool_calls.sol_layout import TOOLS_HEADER
from tests.http.test_http_api import post

CALC_PARAMS = {"type": "object", "properties": {
    "op": {"enum": ["add", "sub", "mul", "div"]},
    "a": {"type": "integer", "minimum": -999, "maximum": 999},
    "b": {"type": "integer", "minimum": -999, "maximum": 999}},
    "required": ["op", "a", "b"], "additionalProperties": False}
WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "integer arithmetic",
                                           "parameters": CALC_PARAMS}},
         {"type": "function", "function": {"name": "weather", "description": "the weather in a city",
                                           "parameters": WEATHER_PARAMS}}]
SCHEMAS = {"calculator": CALC_PARAMS, "weather": WEATHER_PARAMS}
USER = [{"role": "user", "content": "What is 17 times 3?"}]


@pytest.fixture(scope="module")
def client(http_server, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_server.http_url, api_key=api_key, max_retries=0)


def _valid(calls, names=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_yields_valid_calls_100_of_100(client):
    """Temperature 1, twenty seeds x n=5: every one of the 100 answers is a call whose
    arguments validate (random weights: only the grammar makes this so)."""
    valid = 0
    for seed in range(20):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=seed, n=5,
                                           max_tokens=120)
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls", choice
            assert len(choice.message.tool_calls) == 1 and choice.message.content is None
            _valid(choice.message.tool_calls)
            valid += 1
    assert valid == 100


def _accumulate(stream) -> tuple[str | None, list[dict], str | None]:
    """The openai SDK's streamed tool-call deltas put together as a client does: by index,
    the first delta's id and name, arguments concatenated."""
    content, calls, finish = None, {}, None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for d in delta.tool_calls or ():
                if d.index not in calls:
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    assert d.function.arguments == ""
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None
                calls[d.index]["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["auto", "required", "named", "none"])
def test_tool_choice_matrix(client, choice, stream):
    tool_choice = {"type": "function", "function": {"name": "weather"}} if choice == "named" else choice
    kwargs = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice=tool_choice, temperature=0.7, seed=3,
                  max_tokens=80)
    if stream:
        content, calls, finish = _accumulate(client.chat.completions.create(stream=True, **kwargs))
    else:
        r = client.chat.completions.create(**kwargs)
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
        content = msg.content
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in msg.tool_calls or ()]
    if choice in ("required", "named"):
        assert calls and finish in ("tool_calls", "length")
        names = {"weather"} if choice == "named" else set(SCHEMAS)
        complete = calls if finish == "tool_calls" else calls[:1]
        for c in complete:
            assert c["name"] in names and c["id"].startswith("call_")
            jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])
    else:
        # Random weights write no calls on their own: the answer is text.
        assert not calls and finish in ("stop", "length") and isinstance(content, str)


def test_stream_equals_unary_for_forced_calls(client):
    kwargs = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  temperature=0.9, seed=11, max_tokens=120)
    r = client.chat.completions.create(**kwargs)
    content, calls, finish = _accumulate(client.chat.completions.create(stream=True, **kwargs))
    unary = r.choices[0].message.tool_calls
    assert finish == r.choices[0].finish_reason == "tool_calls" and content is None
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in unary]


def test_parallel_calls(client):
    """parallel_tool_calls (default true) lets a forced answer make several calls; false
    makes exactly one."""
    counts = set()
    for seed in range(6):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, n=4, max_tokens=400)
        for choice in r.choices:
            if choice.finish_reason == "tool_calls":
                _valid(choice.message.tool_calls)
                assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
                counts.add(len(choice.message.tool_calls))
    assert 1 in counts and max(counts) > 1, counts


def test_tool_role_round_trip(client, http_server, tiny_tokenizer):
    """The assistant's call and the tool's result are rendered into the prompt (sol's
    layout: the call after the assistant's text, the result as a tool_response turn)."""
    call = {"id": "call_abc", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"op": "mul", "a": 17, "b": 3})}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "51"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=5, temperature=0)
    local = [Message("user", USER[0]["content"]),
             Message("assistant", "", ({"id": "call_abc", "name": "calculator",
                                        "arguments": call["function"]["arguments"]},)),
             Message("tool", "51", (), "call_abc")]
    ids = chat_prompt_ids(tiny_tokenizer, local, tools=TOOLS)
    assert r.usage.prompt_tokens == len(ids)
    text = tiny_tokenizer.decode(ids)
    assert TOOLS_HEADER.strip() in text and '"name": "calculator"' in text
    assert '<tool_call>\n{"name": "calculator", "arguments": {"op": "mul", "a": 17, "b": 3}}\n</tool_call>' in text
    assert "<tool_response>\n51\n</tool_response>" in text
    # /tokenize renders the same prompt with the same tools.
    status, _, body = post(http_server, client.api_key, "/tokenize", {"model": "tiny", "messages": messages,
                                                                   "tools": TOOLS})
    assert status == 200 and json.loads(body)["tokens"] == ids


def test_without_tools_the_prompt_has_no_tools_section(client):
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    with_tools = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!", "parameters": CALC_PARAMS}}]},
     "tools[0].function.name"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(a"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [*USER, {"role": "tool", "content": "51"}]}, "messages[1].tool_call_id"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]}]},
     "messages[0].tool_calls"),
])
def test_bad_tool_requests_are_400_naming_the_param(client, extra, param):
    body = {"messages": USER, **extra}
    messages = body.pop("messages")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **body)
    assert err.value.body["param"] == param, err.value.body


# --- gRPC: the same tools through sol's own client ---------------------------------------
def test_grpc_required_and_stream(http_server, api_key):
    from client.client import Client

    with Client(http_server.target, api_key=api_key) as c:
        r = c.chat(USER, model="tiny", tools=TOOLS, tool_choice="weather", parallel_tool_calls=False,
                   temperature=1.0, seed=5, n=4, max_tokens=120)
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls" and choice.text == ""
            (call,) = choice.tool_calls
            assert call.name == "weather" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
        chunks = list(c.chat_stream(USER, model="tiny", tools=TOOLS, tool_choice="required",
                                    parallel_tool_calls=False, temperature=1.0, seed=5, max_tokens=120))
        calls = [call for ch in chunks for d in ch.deltas for call in d.tool_calls]
        finish = [d.finish_reason for ch in chunks for d in ch.deltas if d.finish_reason]
        assert len(calls) == 1 and finish == ["tool_calls"]
        jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
        # A round trip: the assistant's call and the tool's result as messages.
        messages = [*USER, {"role": "assistant", "tool_calls": [{"id": calls[0].id, "function": {
            "name": calls[0].name, "arguments": calls[0].arguments}}]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
        assert c.chat(messages, model="tiny", tools=TOOLS, max_tokens=3).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs,needle", [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "nope"}, "not in tools"),
    ({"tools": [{"name": "f", "parameters": {"type": "array"}}]}, "tools[0].function.parameters"),
])
def test_grpc_bad_tools_are_invalid_argument(http_server, api_key, kwargs, needle):
    import grpc

    from client.client import Client
    from client.types import SolError

    with Client(http_server.target, api_key=api_key) as c, pytest.raises(SolError) as err:
        c.chat(USER, model="tiny", max_tokens=3, **kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in str(err.value)


def test_tool_parser_setting_picks_the_format(client, tiny_tokenizer, tmp_path):
    """--tool-parser names the family for every model: the forced answer is then written
    (the tokens' own text, from logprobs) and read in Llama 3's JSON form instead of the
    Hermes tags sol's layout shows by default."""
    from client.client import Client
    from gpt.registry import Registry, publish_checkpoint
    from tests.conftest import free_port, make_tiny_model
    from tests.service.harness import ADMIN_KEY, RunningServer

    kwargs = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  temperature=1.0, seed=1, max_tokens=120, logprobs=True)
    default = client.chat.completions.create(**kwargs)
    assert "".join(t.token for t in default.choices[0].logprobs.content).startswith("<tool_call>\n{")
    registry = Registry(tmp_path / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer, max_seq_len=1024), tiny_tokenizer,
                       {"stage": "base"})
    server = RunningServer(registry.root, tmp_path / "home", http_port=free_port(), tool_parser="llama3").start()
    try:
        with Client(server.target, admin_key=ADMIN_KEY) as admin:
            key = admin.create_key("llama3")[0]
        other = openai.OpenAI(base_url=server.http_url, api_key=key, max_retries=0)
        r = other.chat.completions.create(**kwargs)
        raw = "".join(t.token for t in r.choices[0].logprobs.content)
        assert raw.startswith('{"name": "') and '"parameters": {' in raw
        assert r.choices[0].finish_reason == "tool_calls"
        _valid(r.choices[0].message.tool_calls)
    finally:
        server.stop()


def test_streamed_calls_of_several_choices(client):
    """n=3 streamed: each choice's call deltas arrive under its own choice index, each
    call's header before its arguments, and each choice ends with tool_calls."""
    stream = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, temperature=1.0, seed=7, n=3,
                                            max_tokens=120, stream=True)
    calls: dict[int, dict] = {}
    finish: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or ():
                assert d.index == 0
                if d.id is not None:
                    assert choice.index not in calls and d.function.arguments == ""
                    calls[choice.index] = {"name": d.function.name, "arguments": ""}
                else:
                    calls[choice.index]["arguments"] += d.function.arguments
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls", 2: "tool_calls"}
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])
    assert sorted(calls) == [0, 1, 2]
