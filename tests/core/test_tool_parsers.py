"""The tool-call parsers of each template family, whole and streamed: calls come out with
their arguments as JSON text, text outside calls is content, malformed calls stay
content, and a stream in any pieces yields exactly what the whole answer yields."""

from __future__ import annotations

import json

import pytest

from gpt.tool_calls import StreamParser, detect_family, parse

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
TIME = {"name": "get_time", "arguments": {"tz": "CET"}}


def _hermes(*calls) -> str:
    return "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


CASES = {
    "hermes": [
        (_hermes(WEATHER), None, [WEATHER]),
        ("Let me look. " + _hermes(WEATHER, TIME), "Let me look. ", [WEATHER, TIME]),
        ("<tool_call>\n{not json}\n</tool_call> ok", "<tool_call>\n{not json}\n</tool_call> ok", []),
        ("<tool_call>\n{\"name\": \"x\", \"arguments\": {\"a\": 1}", "<tool_call>\n{\"name\": \"x\", "
                                                                   "\"arguments\": {\"a\": 1}", []),
        ("just text", "just text", []),
    ],
    "llama3": [
        (json.dumps({"name": "get_weather", "parameters": WEATHER["arguments"]}), None, [WEATHER]),
        ("<|python_tag|>" + json.dumps({"name": "get_time", "parameters": TIME["arguments"]}) + "; "
         + json.dumps({"name": "get_weather", "parameters": WEATHER["arguments"]}), None, [TIME, WEATHER]),
        ('{"answer": 42}', '{"answer": 42}', []),
        ("The weather is fine.", "The weather is fine.", []),
    ],
    "mistral": [
        ("[TOOL_CALLS]" + json.dumps([WEATHER, TIME]), None, [WEATHER, TIME]),
        (json.dumps([WEATHER]), None, [WEATHER]),
        ("Sure. [TOOL_CALLS]" + json.dumps([TIME]), "Sure. ", [TIME]),
        ("[1, 2, 3]", "[1, 2, 3]", []),
        ("no calls here", "no calls here", []),
    ],
}


def _calls(parsed) -> list[dict]:
    return [{"name": c.name, "arguments": json.loads(c.arguments)} for c in parsed]


@pytest.mark.parametrize("family,text,content,calls",
                         [(f, *case) for f, cases in CASES.items() for case in cases])
def test_whole_answer(family, text, content, calls):
    parsed = parse(family, text)
    assert parsed.content == content
    assert _calls(parsed.calls) == calls
    for c in parsed.calls:
        assert isinstance(c.arguments, str)


@pytest.mark.parametrize("piece", [1, 3, 7])
@pytest.mark.parametrize("family,text,content,calls",
                         [(f, *case) for f, cases in CASES.items() for case in cases])
def test_streamed_in_pieces_equals_whole(family, text, content, calls, piece):
    stream = StreamParser(family)
    got_content, got_calls = "", []
    pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
    for k, p in enumerate(pieces):
        c, new = stream.feed(p, final=k == len(pieces) - 1)
        got_content += c
        got_calls += new
    assert (got_content or None) == content
    assert [c.index for c in got_calls] == list(range(len(calls)))
    assert _calls(got_calls) == calls
    assert all(c.id.startswith("call_") for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


def test_stream_holds_a_half_written_tag_and_sends_content_early():
    stream = StreamParser("hermes")
    assert stream.feed("Checking <tool_") == ("Checking ", [])
    content, calls = stream.feed('call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    assert content == "" and [c.name for c in calls] == ["f"]


def test_limit_keeps_the_first_call():
    text = _hermes(WEATHER, TIME)
    assert _calls(parse("hermes", text, limit=1).calls) == [WEATHER]


@pytest.mark.parametrize("source,family", [
    ("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>", "hermes"),
    ('{{ "[TOOL_CALLS]" }}', "mistral"),
    ('<|python_tag|>{"name": ...', "llama3"),
    ('{"name": "x", "parameters": {}}', "llama3"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
])
def test_family_from_template(source, family):
    assert detect_family(source) == family
