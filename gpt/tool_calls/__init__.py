"""Tool calling, model side: how a template family writes a call (Hermes/Qwen JSON in
`<tool_call>` tags, Llama 3's bare JSON, Mistral's `[TOOL_CALLS]` list), the parser that
reads calls back out of generated text (whole or as it streams), the grammar that forces
a call in that form over the tools' parameter schemas, and sol's own layout's tools
section. Nothing here knows a protocol: server/tools.py maps requests onto it."""

from gpt.tool_calls.calls import Parsed, ToolCall, new_call_id
from gpt.tool_calls.grammar import call_grammar
from gpt.tool_calls.parsers import FAMILIES, detect_family, parse
from gpt.tool_calls.stream import CallStart, StreamParser

__all__ = ["FAMILIES", "CallStart", "Parsed", "StreamParser", "ToolCall", "call_grammar", "detect_family",
           "new_call_id", "parse"]
