"""RL prompts: the conversation the policy continues, and any other fields, which the
reward function receives as the row:

    {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}

("prompt": a string is the same as one user message). The last message may not be the
assistant's: the policy writes that turn. A prompt must leave room for the reply:
prompt tokens + max_new_tokens <= the model's context, or it is refused (or, with
`skip_long`, left out and counted as skipped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.tokenizer import SolTokenizer
from training.datasets.prefs import prompt_messages
from training.datasets.render import Counts, prompt_ids, require_rows
from training.datasets.rows import Row, read_rows


@dataclass
class PromptRow:
    row: Row
    messages: list[dict[str, Any]]

    @property
    def where(self) -> str:
        return f"{self.row.path}:{self.row.line}"


@dataclass
class PromptsData:
    path: str
    prompts: list[PromptRow]
    ids: list[list[int]] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)


def parse_prompt(row: Row) -> PromptRow:
    messages, key = prompt_messages(row)
    if messages[-1]["role"] == "assistant":
        raise row.error(f"{key}[{len(messages) - 1}].role", "a prompt that ends before the assistant's turn",
                        "'assistant'")
    return PromptRow(row, messages)


def read_prompts(path: str | Path) -> list[PromptRow]:
    return [parse_prompt(row) for row in read_rows(path)]


def encode_prompts(path: str, prompts: list[PromptRow], tokenizer: SolTokenizer, context: int,
                   max_new_tokens: int, skip_long: bool = False) -> PromptsData:
    data = PromptsData(path, [])
    limit = context - max_new_tokens
    for p in prompts:
        ids = prompt_ids(tokenizer, p.row, "messages", p.messages)
        if len(ids) > limit:
            if skip_long:
                data.counts.skipped += 1
                continue
            raise p.row.error("messages", f"a prompt of at most {limit} tokens (the context of {context} less "
                              f"{max_new_tokens} for the reply)", f"{len(ids)} tokens")
        data.prompts.append(p)
        data.ids.append(ids)
        data.counts.rows += 1
        data.counts.tokens += len(ids)
    require_rows(path, data.counts)
    return data


def load_prompts(path: str | Path, tokenizer: SolTokenizer, context: int, max_new_tokens: int,
                 skip_long: bool = False) -> PromptsData:
    return encode_prompts(str(path), read_prompts(path), tokenizer, context, max_new_tokens, skip_long)
