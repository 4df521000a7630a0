"""Preference data, in TRL's standard form (strings)

    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}

or its conversational form (arrays of messages; "messages" may name the prompt):

    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
     "chosen": [{"role": "assistant", "content": "5"}],
     "rejected": [{"role": "assistant", "content": "6"}]}

Each side is rendered as prompt + completion through the chat template; its trained
tokens are the completion's assistant tokens (assistant turns inside the prompt are
context). Both sides follow the long-row rule of `render.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.tokenizer import SolTokenizer
from training.datasets.messages import as_messages
from training.datasets.render import Counts, Encoded, SkipRow, fit, render, require_rows
from training.datasets.rows import Row, read_rows


@dataclass
class Preference:
    row: Row
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded


@dataclass
class PrefsData:
    path: str
    preferences: list[Preference]
    pairs: list[EncodedPair] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)


def prompt_messages(row: Row) -> tuple[list[dict[str, Any]], str]:
    """The prompt of a preference or RL row ("prompt", string or messages, or
    "messages") and the field it came from."""
    data = row.data
    if "prompt" in data and "messages" in data:
        raise row.error("prompt", 'either "prompt" or "messages"', "both")
    key = "prompt" if "prompt" in data else "messages"
    if key not in data:
        raise row.error("prompt", 'a prompt ("prompt": a string or messages, or "messages")', "nothing")
    return as_messages(row, data[key], key, "user"), key


def _completion(row: Row, key: str) -> list[dict[str, Any]]:
    messages = as_messages(row, row.data.get(key), key, "assistant")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise row.error(key, "a non-empty assistant reply", "an empty one")
    return messages


def parse_preference(row: Row) -> Preference:
    prompt, key = prompt_messages(row)
    chosen, rejected = _completion(row, "chosen"), _completion(row, "rejected")
    if chosen == rejected:
        raise row.error("rejected", "a reply different from chosen", "the same reply")
    return Preference(row, prompt, chosen, rejected)


def read_prefs(path: str | Path) -> list[Preference]:
    return [parse_preference(row) for row in read_rows(path)]


def _side(tokenizer: SolTokenizer, p: Preference, key: str, context: int, skip_long: bool) -> Encoded:
    completion = p.chosen if key == "chosen" else p.rejected
    messages = p.prompt + completion
    trained = [i >= len(p.prompt) for i, m in enumerate(messages) if m["role"] == "assistant"]
    return fit(p.row, key, render(tokenizer, p.row, key, messages, trained), context, skip_long)


def encode_pair(tokenizer: SolTokenizer, p: Preference, context: int, skip_long: bool = False) -> EncodedPair:
    pair = EncodedPair(_side(tokenizer, p, "chosen", context, skip_long),
                       _side(tokenizer, p, "rejected", context, skip_long))
    if pair.chosen.ids == pair.rejected.ids:
        raise p.row.error("rejected", f"a reply that differs from chosen within the first {context} tokens",
                          "the same tokens after truncation")
    return pair


def encode_prefs(path: str, preferences: list[Preference], tokenizer: SolTokenizer, context: int,
                 skip_long: bool = False) -> PrefsData:
    data = PrefsData(path, [])
    for p in preferences:
        try:
            pair = encode_pair(tokenizer, p, context, skip_long)
        except SkipRow:
            data.counts.skipped += 1
            continue
        data.preferences.append(p)
        data.pairs.append(pair)
        data.counts.rows += 1
        data.counts.tokens += len(pair.chosen.ids) + len(pair.rejected.ids)
        data.counts.trained_tokens += sum(pair.chosen.mask) + sum(pair.rejected.mask)
        data.counts.truncated += pair.chosen.truncated or pair.rejected.truncated
    require_rows(path, data.counts)
    return data


def load_prefs(path: str | Path, tokenizer: SolTokenizer, context: int, skip_long: bool = False) -> PrefsData:
    return encode_prefs(str(path), read_prefs(path), tokenizer, context, skip_long)
