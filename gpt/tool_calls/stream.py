"""Tool calls as a stream goes: each piece of text is read with the family's parser
(gpt/tool_calls/parsers.py) over everything so far, and what is new since the last piece
comes out: content that can no longer be part of a call, and each call once it is
complete (OpenAI's first tool-call delta: index, id, name; then its arguments)."""

from __future__ import annotations

from dataclasses import dataclass

from gpt.tool_calls.calls import new_call_id
from gpt.tool_calls.parsers import split


@dataclass(frozen=True)
class CallStart:
    index: int                      # the call's place among the choice's calls
    id: str
    name: str
    arguments: str                  # the whole arguments object as JSON text


class StreamParser:
    def __init__(self, family: str, limit: int | None = None) -> None:
        self.family = family
        self.limit = limit          # parallel_tool_calls false: one call
        self.text = ""
        self.sent = 0               # characters of content already sent
        self.calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[CallStart]]:
        """(new content, new complete calls) after `delta`; `final` at the answer's end."""
        self.text += delta
        content, calls = split(self.family, self.text, final)
        if self.limit is not None:
            calls = calls[:self.limit]
        new_content = ""
        # Whitespace before anything else is held: between calls it is no content.
        if len(content) > self.sent and (self.sent or content.strip()):
            new_content, self.sent = content[self.sent:], len(content)
        new_calls = [CallStart(i, new_call_id(), c.name, c.arguments)
                     for i, c in enumerate(calls[self.calls:], start=self.calls)]
        self.calls = max(self.calls, len(calls))
        return new_content, new_calls
