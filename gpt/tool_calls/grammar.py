"""The grammar that forces tool calls (tool_choice required or a named function): a Lark
grammar (llguidance's dialect, served as a `grammar` response_format) whose calls are
written in the family's format and whose call objects are JSON Schema-constrained: the
name one of the tools' names and the arguments that tool's parameters schema. With
`parallel` False exactly one call is allowed, else one or more."""

from __future__ import annotations

import json
from typing import Any

# The layout of sol's JSON outputs (server/engine/grammar.py JSON_LAYOUT): json.dumps's
# separators and no free whitespace, and unsupported schema keywords refused.
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
_ARGUMENTS_KEY = {"hermes": "arguments", "llama3": "parameters", "mistral": "arguments"}


def call_schema(family: str, tools: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One call object of any of `tools` ((name, parameters schema) pairs)."""
    key = _ARGUMENTS_KEY[family]
    options = [{"type": "object", "properties": {"name": {"const": name}, key: params or {"type": "object"}},
                "required": ["name", key], "additionalProperties": False} for name, params in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": _LAYOUT}


def call_grammar(family: str, tools: list[tuple[str, dict[str, Any]]], parallel: bool) -> str:
    body = "call_json: %json " + json.dumps(call_schema(family, tools), ensure_ascii=False)
    if family == "hermes":
        call = 'call: "<tool_call>\\n" call_json "\\n</tool_call>"'
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
    elif family == "llama3":
        call = "call: call_json"
        start = 'start: call ("; " call)*' if parallel else "start: call"
    else:
        call = "call: call_json"
        start = 'start: "[" call (", " call)* "]"' if parallel else 'start: "[" call "]"'
    return "\n".join((start, call, body)) + "\n"
