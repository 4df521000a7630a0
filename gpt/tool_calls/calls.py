"""A parsed tool call and a parsed output: the shapes every family's parser returns."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


def new_call_id() -> str:
    """An id in OpenAI's form (`call_` + 24 characters), unique per call."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str                  # the arguments object as JSON text (OpenAI's function.arguments)


@dataclass
class Parsed:
    """Generated text split into the text outside calls and the calls, in order.
    `content` is None when nothing but whitespace is left outside the calls."""

    content: str | None
    calls: list[ToolCall] = field(default_factory=list)
