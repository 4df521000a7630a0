"""SFT data: OpenAI's chat fine-tuning form, one conversation per line,

    {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "5"}], "tools": [...]}

(`"weight": 0` on an assistant message: context, not trained on; `tools` is accepted and
kept, but sol's own chat template has no tools section yet, so the model does not see
it), or the prompt/completion form `{"prompt": "...", "completion": "..."}` (strings:
one user and one assistant message; or arrays of messages). The loss is on the
template's assistant tokens of the trained messages only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.tokenizer import SolTokenizer
from training.batching import IGNORE_INDEX
from training.datasets.errors import describe
from training.datasets.messages import as_messages, parse_messages
from training.datasets.render import Counts, Encoded, SkipRow, fit, render, require_rows
from training.datasets.rows import Row, read_rows


@dataclass
class Conversation:
    row: Row
    messages: list[dict[str, Any]]
    tools: list[Any] | None = None

    @property
    def trained(self) -> list[bool]:
        return [m.get("weight", 1) == 1 for m in self.messages if m["role"] == "assistant"]


@dataclass
class SFTData:
    path: str
    conversations: list[Conversation]
    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)   # (inputs, targets)
    counts: Counts = field(default_factory=Counts)


def parse_conversation(row: Row) -> Conversation:
    data = row.data
    if "messages" in data:
        if "prompt" in data or "completion" in data:
            raise row.error("messages", "either messages or prompt and completion", "both")
        messages = parse_messages(row, data["messages"], "messages")
    elif "prompt" in data or "completion" in data:
        for key in ("prompt", "completion"):
            if key not in data:
                raise row.error(key, "a string or an array of messages", "nothing")
        messages = as_messages(row, data["prompt"], "prompt", "user") + as_messages(
            row, data["completion"], "completion", "assistant")
    else:
        raise row.error("messages", 'an array of messages (or "prompt" and "completion")', "neither")
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise row.error("tools", "an array of tool definitions", describe(tools))
    conversation = Conversation(row, messages, tools)
    if not any(conversation.trained):
        got = "no assistant message" if not conversation.trained else "every assistant message has weight 0"
        raise row.error("messages", "an assistant message to learn", got)
    return conversation


def read_sft(path: str | Path) -> list[Conversation]:
    """Structure only (no tokenizer): what `sol data check` can say without a model."""
    return [parse_conversation(row) for row in read_rows(path)]


def encode_conversation(tokenizer: SolTokenizer, conversation: Conversation) -> Encoded:
    return render(tokenizer, conversation.row, "messages", conversation.messages, conversation.trained)


def sft_targets(encoded: Encoded) -> tuple[list[int], list[int]]:
    """(inputs, targets): each target is the next token where the mask is 1."""
    targets = [t if m else IGNORE_INDEX for t, m in zip(encoded.ids[1:], encoded.mask[1:], strict=True)]
    return encoded.ids[:-1], targets


def encode_sft(path: str, conversations: list[Conversation], tokenizer: SolTokenizer, context: int,
               skip_long: bool = False) -> SFTData:
    data = SFTData(path, [])
    for conversation in conversations:
        try:
            encoded = fit(conversation.row, "messages", encode_conversation(tokenizer, conversation), context,
                          skip_long)
        except SkipRow:
            data.counts.skipped += 1
            continue
        data.conversations.append(conversation)
        data.examples.append(sft_targets(encoded))
        data.counts.rows += 1
        data.counts.tokens += len(encoded.ids)
        data.counts.trained_tokens += sum(encoded.mask)
        data.counts.truncated += encoded.truncated
    require_rows(path, data.counts)
    return data


def load_sft(path: str | Path, tokenizer: SolTokenizer, context: int, skip_long: bool = False) -> SFTData:
    """Every row checked and encoded; the first bad row raises a DataError."""
    return encode_sft(str(path), read_sft(path), tokenizer, context, skip_long)
