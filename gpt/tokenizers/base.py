"""The tokenizer interface: what serving and training need of any tokenizer kind.

Two kinds implement it: sol's own byte-level BPE served through tiktoken
(`gpt.tokenizer.SolTokenizer`) and a model's own Hugging Face `tokenizer.json`
(`gpt.tokenizers.hf.HFTokenizer`). Callers use only these members.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message names the file and what is wrong."""


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int                  # every id is in [0, vocab_size)
    special_ids: dict[str, int]      # special token text -> id (never produced by encode())
    bos_id: int | None               # what a document starts with, if anything
    eos_ids: list[int]               # ids that end a plain completion (the first is the main one)
    pad_id: int                      # an id to pad batches with (never trained on)
    # The model's Jinja chat template; None for sol's own layout (SolTokenizer, rendered by
    # gpt/chat.py) or a model that has none.
    chat_template: str | None
    # True when decode(ids) equals the concatenated token_bytes of ids for ordinary tokens,
    # so text can be streamed by bytes alone (gpt/tokenizer.py's kind, byte-level BPE);
    # False when the decoder looks at neighbours (metaspace's leading space, byte fallback).
    concatenates_bytes: bool
    # Byte-fallback pieces (<0xNN>): their text depends on the whole run of them.
    byte_piece_ids: frozenset[int]

    def encode(self, text: str) -> list[int]:
        """Text as ordinary text: nothing added, special-token strings in it stay text."""
        ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt as the model's own tokenizer reads it (Hugging Face:
        `tokenizer(text)`, with BOS as the checkpoint asks and special tokens parsed)."""
        ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of `ids` joined (each token as it reads in the middle of a text)."""
        ...

    def special(self, token: str) -> int:
        ...

    def is_special(self, token_id: int) -> bool:
        ...

    def save(self, directory: Path) -> Path:
        ...
