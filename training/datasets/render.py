"""Messages -> token ids and a loss mask through the model's chat template
(`gpt.chat.render_chat`), and the long-row rule every stage shares.

The mask is the template's: 1 on assistant tokens only. Assistant messages that must not
be trained on (SFT `"weight": 0`, or a preference pair's prompt turns) are taken out by
position: the template marks each assistant message as one run of 1s, and the k-th run
is the k-th assistant message. A template that does not mark them so is refused rather
than guessed at.

The long-row rule: a row may hold at most the model's context (`max_seq_len`) tokens.
A longer row whose trained tokens start inside the context is cut from the right (its
completion is truncated, counted as `truncated`); one whose prompt alone fills the
context is refused, or with `skip_long` left out and counted as `skipped`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpt.chat import render_chat
from gpt.tokenizer import SolTokenizer
from training.datasets.errors import DataError
from training.datasets.rows import Row


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]            # 1 where the token is trained on
    truncated: bool = False

    @property
    def first_trained(self) -> int:
        return self.mask.index(1)


@dataclass
class Counts:
    """What a loader read, for the stage output and `sol data check`."""

    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    skipped: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                "truncated": self.truncated, "skipped": self.skipped}


def require_rows(path: str, counts: Counts) -> None:
    """A file whose every row was skipped leaves nothing to train on."""
    if counts.rows == 0:
        raise DataError(path, 1, "file", "at least one row that fits the context", f"{counts.skipped} skipped")


class SkipRow(Exception):
    """A row left out under `skip_long` (counted, not an error)."""


def assistant_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s in a mask."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def render(tokenizer: SolTokenizer, row: Row, field: str, messages: list[dict[str, Any]],
           trained: list[bool]) -> Encoded:
    """The conversation's ids, with the mask kept only on the assistant messages whose
    entry in `trained` (one per assistant message, in order) is True."""
    try:
        chat = render_chat(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
    except (ValueError, KeyError) as err:
        raise row.error(field, "messages the model's chat template can render", str(err)) from None
    runs = assistant_runs(chat.mask)
    if len(runs) != len(trained):
        raise row.error(field, f"a chat template that marks each of the {len(trained)} assistant messages",
                        f"{len(runs)} marked spans")
    mask = [0] * len(chat.ids)
    for (start, end), keep in zip(runs, trained, strict=True):
        if keep:
            mask[start:end] = [1] * (end - start)
    return Encoded(list(chat.ids), mask)


def fit(row: Row, field: str, encoded: Encoded, context: int, skip_long: bool) -> Encoded:
    """The long-row rule (module docstring)."""
    if 1 not in encoded.mask:
        raise row.error(field, "at least one token to train on", "none (every assistant message has weight 0)")
    if len(encoded.ids) <= context:
        return encoded
    if encoded.first_trained >= context:
        if skip_long:
            raise SkipRow
        raise row.error(field, f"a prompt shorter than the model's context of {context} tokens",
                        f"{encoded.first_trained} prompt tokens")
    return Encoded(encoded.ids[:context], encoded.mask[:context], truncated=True)


def prompt_ids(tokenizer: SolTokenizer, row: Row, field: str, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt the policy continues: the conversation and the generation prompt."""
    try:
        return list(render_chat(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages],
                                add_generation_prompt=True).ids)
    except (ValueError, KeyError) as err:
        raise row.error(field, "messages the model's chat template can render", str(err)) from None
