"""The grammar that forces tool calls, per template family, against the parser that reads
them: a call written in the family's format with valid arguments is accepted token by
token and parses back to the same call; a wrong function name, arguments that break the
schema, or a second call where only one is allowed are refused."""

from __future__ import annotations

import json

import pytest

from gpt.tool_calls import call_grammar, parse
from server.engine.api import ResponseFormat
from server.engine.grammar import GrammarCompiler

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
ECHO = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 8}}, "required": ["text"],
        "additionalProperties": False}
TOOLS = [("add", ADD), ("echo", ECHO)]


def _written(family: str, calls: list[tuple[str, dict]]) -> str:
    """Calls as the family writes them (json.dumps's layout, as the grammar's)."""
    key = "parameters" if family == "llama3" else "arguments"
    objs = [json.dumps({"name": n, key: a}) for n, a in calls]
    if family == "hermes":
        return "\n".join(f"<tool_call>\n{o}\n</tool_call>" for o in objs)
    if family == "llama3":
        return "; ".join(objs)
    return "[" + ", ".join(objs) + "]"


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer) -> GrammarCompiler:
    return GrammarCompiler.for_tokenizer(tiny_tokenizer)


def _accepts(compiler, tokenizer, family: str, text: str, parallel: bool = True,
             tools=TOOLS) -> bool:
    grammar = compiler.compile(ResponseFormat("grammar", grammar=call_grammar(family, tools, parallel)))
    matcher = grammar.matcher()
    return all(matcher.accept(t) for t in tokenizer.encode(text)) and matcher.is_accepting()


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral"])
def test_valid_calls_are_accepted_and_parse_back(compiler, tiny_tokenizer, family):
    calls = [("add", {"a": 2, "b": -3}), ("echo", {"text": "hi"})]
    text = _written(family, calls)
    assert _accepts(compiler, tiny_tokenizer, family, text)
    parsed = parse(family, text)
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert _accepts(compiler, tiny_tokenizer, family, _written(family, calls[:1]), parallel=False)


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("calls,parallel", [
    ([("sub", {"a": 1, "b": 2})], True),                       # no such tool
    ([("add", {"a": 1})], True),                               # a required argument missing
    ([("echo", {"text": "far too long"})], True),              # past maxLength
    ([("add", {"a": 1, "b": 2, "c": 3})], True),               # an argument the schema does not have
    ([("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})], False),   # two calls, one allowed
])
def test_invalid_calls_are_refused(compiler, tiny_tokenizer, family, calls, parallel):
    assert not _accepts(compiler, tiny_tokenizer, family, _written(family, calls), parallel)


def test_a_named_function_allows_only_it(compiler, tiny_tokenizer):
    only_echo = [("echo", ECHO)]
    assert _accepts(compiler, tiny_tokenizer, "hermes", _written("hermes", [("echo", {"text": "x"})]),
                    tools=only_echo)
    assert not _accepts(compiler, tiny_tokenizer, "hermes", _written("hermes", [("add", {"a": 1, "b": 2})]),
                        tools=only_echo)
