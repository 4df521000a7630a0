"""A request's tools, protocol-neutral: what both adapters map `tools`, `tool_choice` and
`parallel_tool_calls` onto, checked once here (INVALID_ARGUMENT naming the field), and
what the request path does with them: the tools go into the chat template, the model's
template family picks the call format and parser (gpt/tool_calls), and `required` or a
named function becomes a grammar over the tools' parameter schemas in that format, so
the calls are always there and their arguments always parse and validate."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gpt.quoting import quote
from gpt.tokenizer import SolTokenizer
from gpt.tokenizers.base import Tokenizer
from gpt.tool_calls import call_grammar, detect_family
from server.engine.api import ResponseFormat
from server.errors import invalid

TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHOICES = ("none", "auto", "required", "function")
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def openai(self) -> dict[str, Any]:
        """OpenAI's tool object, as chat templates read `tools`."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: str = "auto"            # none, auto, required, or function (the one named)
    function: str = ""              # with choice "function"
    parallel: bool = True           # parallel_tool_calls: false allows one call

    @property
    def forced(self) -> bool:
        """A call is required (any tool, or the named one): enforced by a grammar."""
        return self.choice in ("required", "function")

    @property
    def parsed(self) -> bool:
        """The answer is read for calls (tool_choice none leaves it text)."""
        return self.choice != "none"

    @property
    def limit(self) -> int | None:
        return None if self.parallel else 1

    def template_tools(self) -> list[dict[str, Any]]:
        return [t.openai() for t in self.tools]


def tool_request(tools: list[Tool], choice: str | None, function: str = "",
                 parallel: bool | None = None) -> ToolRequest | None:
    """The checked request, or None when it has no tools (and asks for none)."""
    if not tools:
        if choice not in (None, "", "none"):
            raise invalid(f"tool_choice {quote(function or choice)} needs tools: send the functions in tools",
                          "tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise invalid(f"at most {MAX_TOOLS} tools (got {len(tools)})", "tools")
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if not TOOL_NAME_RE.fullmatch(t.name):
            raise invalid(f"tools[{i}].function.name must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-' "
                          f"(got {quote(t.name)})", f"tools[{i}].function.name")
        if t.name in seen:
            raise invalid(f"tools[{i}].function.name {quote(t.name)} is given twice; tool names must be unique",
                          f"tools[{i}].function.name")
        seen.add(t.name)
        if not isinstance(t.parameters, dict) or t.parameters.get("type", "object") != "object":
            raise invalid(f"tools[{i}].function.parameters must be a JSON Schema of an object "
                          "({\"type\": \"object\", \"properties\": {...}})", f"tools[{i}].function.parameters")
    choice = choice or "auto"
    if choice not in CHOICES:
        raise invalid(f"tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": "
                      f"{{\"name\": ...}}}} (got {quote(choice)})", "tool_choice")
    if choice == "function" and function not in seen:
        raise invalid(f"tool_choice names the function {quote(function)}, which is not in tools "
                      f"({', '.join(sorted(seen))})", "tool_choice")
    return ToolRequest(tuple(tools), choice, function if choice == "function" else "",
                       True if parallel is None else parallel)


def family_of(tokenizer: Tokenizer) -> str | None:
    """The call format of the model's chat template: sol's own layout writes Hermes calls."""
    if isinstance(tokenizer, SolTokenizer):
        return "hermes"
    return detect_family(tokenizer.chat_template)


def call_format(request: ToolRequest, family: str) -> ResponseFormat:
    """The grammar response_format that forces the calls of a `required` or named choice."""
    tools = [t for t in request.tools if request.choice != "function" or t.name == request.function]
    return ResponseFormat("grammar", grammar=call_grammar(family, [(t.name, t.parameters) for t in tools],
                                                          request.parallel))
