"""Reading tool calls out of generated text, one parser per template family:

- hermes (Qwen2/2.5/3, Hermes, sol's own layout): each call is a JSON object
  `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`; text
  outside the tags is content.
- llama3: the whole answer is a JSON object `{"name": ..., "parameters": {...}}` (several
  separated by `;`), optionally after `<|python_tag|>`.
- mistral: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}`; text
  before it is content. A reply that *starts* with such a list is read the same way, since
  `[TOOL_CALLS]` is a special token that the text of an answer leaves out.

`split(family, text, final)` is the one reading: with `final` False (a stream in progress)
it returns only content that can no longer turn out to be part of a call (a half-written
`<tool_cal` is held back) and only calls that are complete. Text that looks like a call but
does not parse (bad JSON, no name) stays content: nothing generated is dropped.
"""

from __future__ import annotations

import json
from typing import Any

from gpt.tool_calls.calls import Parsed, ToolCall

FAMILIES = ("hermes", "llama3", "mistral")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_MARK = "[TOOL_CALLS]"


def detect_family(template_source: str | None) -> str | None:
    """The call format a chat template writes (from its source), or None when the template
    shows no tool-call format (it may not render tools at all)."""
    src = template_source or ""
    if MISTRAL_MARK in src:
        return "mistral"
    if HERMES_OPEN in src:
        return "hermes"
    if PYTHON_TAG in src or '"parameters"' in src:
        return "llama3"
    return None


def _call(obj: Any, keys: tuple[str, ...]) -> ToolCall | None:
    """A call from a decoded JSON object with a string name and an object of arguments
    under one of `keys` (an arguments string holding an object is accepted too)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _held(tail: str, marker: str) -> str:
    """`tail` less any ending that could be the start of `marker` (still being written)."""
    for n in range(min(len(marker) - 1, len(tail)), 0, -1):
        if marker.startswith(tail[-n:]):
            return tail[:-n]
    return tail


def _hermes(text: str, final: bool) -> tuple[str, list[ToolCall]]:
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(HERMES_OPEN, pos)
        if start < 0:
            tail = text[pos:]
            content.append(tail if final else _held(tail, HERMES_OPEN))
            break
        end = text.find(HERMES_CLOSE, start)
        if end < 0:
            # An unclosed call: content once the answer is over, held back until then.
            content.append(text[pos:] if final else text[pos:start])
            break
        body = text[start + len(HERMES_OPEN):end]
        try:
            call = _call(json.loads(body), ("arguments", "parameters"))
        except ValueError:
            call = None
        if call is None:
            content.append(text[pos:end + len(HERMES_CLOSE)])
        else:
            content.append(text[pos:start])
            calls.append(call)
        pos = end + len(HERMES_CLOSE)
    # Whitespace alone around or between calls is layout, not content (held while it may be).
    return "".join(c for c in content if c.strip()), calls


def _json_sequence(text: str, separators: str) -> list[Any] | None:
    """The JSON values `text` holds one after another (separated by `separators` and
    whitespace), or None when anything else is in it."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos >= len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)


def _llama3(text: str, final: bool) -> tuple[str, list[ToolCall]]:
    body = text.lstrip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    if not final:
        # A JSON answer is a call until it is known not to be one: held to the end.
        return ("", []) if not body or body.startswith("{") or PYTHON_TAG.startswith(body) else (text, [])
    if body.startswith("{"):
        values = _json_sequence(body, ";")
        calls = [_call(v, ("parameters", "arguments")) for v in values or ()]
        if values and all(calls):
            return "", calls
    return text, []


def _mistral(text: str, final: bool) -> tuple[str, list[ToolCall]]:
    at = text.find(MISTRAL_MARK)
    if at < 0 and text.lstrip().startswith("["):
        before, after = "", text.lstrip()
    elif at >= 0:
        before, after = text[:at], text[at + len(MISTRAL_MARK):]
    else:
        return (text if final else _held(text, MISTRAL_MARK)), []
    if not final:
        return before, []
    values = _json_sequence(after, "")
    flat = [c for v in values or () for c in (v if isinstance(v, list) else [v])]
    calls = [_call(v, ("arguments", "parameters")) for v in flat]
    if values and flat and all(calls):
        return before, calls
    return text, []


_SPLITTERS = {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral}


def split(family: str, text: str, final: bool = True) -> tuple[str, list[ToolCall]]:
    """(the text outside calls, the calls) of `text` in `family`'s format."""
    return _SPLITTERS[family](text, final)


def parse(family: str, text: str, limit: int | None = None) -> Parsed:
    """A whole answer's calls (the first `limit` of them, when given) and content."""
    content, calls = split(family, text, final=True)
    return Parsed(content if content.strip() else None, calls[:limit] if limit is not None else calls)
