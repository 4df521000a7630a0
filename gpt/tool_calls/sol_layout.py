"""Tools in sol's own chat layout (gpt/chat.py), which has roles system, user and
assistant only: the tools go at the end of the system turn (one is opened when the
conversation has none), listed as JSON with the call format, the Hermes form
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which the hermes parser
reads); an assistant's calls are written in that form after its text, and a tool's
result is a user turn in `<tool_response>` tags."""

from __future__ import annotations

import json
from typing import Any

TOOLS_HEADER = ("# Tools\n\nYou can call these functions (one JSON object a line, each with its name, "
                "description and a JSON Schema of its arguments):\n<tools>\n")
TOOLS_FOOTER = ("\n</tools>\n\nTo call one, answer with a JSON object of its name and arguments between tags, "
                "one call per pair of tags:\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": "
                "{<arguments>}}\n</tool_call>")


def tools_text(tools: list[dict[str, Any]]) -> str:
    return TOOLS_HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_FOOTER


def call_text(name: str, arguments: Any) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def assistant_text(content: str, tool_calls: list[dict[str, Any]]) -> str:
    calls = "\n".join(call_text(c["name"], c["arguments"]) for c in tool_calls)
    return f"{content}\n{calls}" if content and calls else content or calls


def tool_result_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"
