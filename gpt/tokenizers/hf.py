"""A model's own tokenizer: its Hugging Face `tokenizer.json`, through the `tokenizers`
library, with the settings transformers reads beside it (gpt/tokenizers/hf_files.py).

Covers what Llama/Mistral/Qwen checkpoints ship: byte-level BPE (Llama 3, Qwen, SmolLM2)
and SentencePiece-style metaspace BPE with byte fallback (Llama 2, Mistral, TinyLlama),
with their added and special tokens. Ids equal transformers' `AutoTokenizer` for the same
directory (tested): `encode_prompt` is `tokenizer(text)["input_ids"]`, `decode` is
`tokenizer.decode(ids)` (sol never applies `clean_up_tokenization_spaces`, a lossy
post-edit that Llama 3, Qwen and Mistral ship turned off).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFBackend

from gpt.tokenizers.base import TokenizerError
from gpt.tokenizers.byte_level import piece_bytes
from gpt.tokenizers.hf_files import HF_TOKENIZER_FILES, HFTokenizerSettings, read_settings

TOKENIZER_FILE = "tokenizer.json"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def check_tokenizer_json(text: str, source: str) -> dict[str, Any]:
    """The parsed tokenizer.json, or TokenizerError naming `source` and what is wrong."""
    try:
        spec = json.loads(text)
    except ValueError as err:
        raise TokenizerError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise TokenizerError(f"{source} must hold a JSON object (a Hugging Face tokenizer), "
                             f"not {type(spec).__name__}")
    model = spec.get("model")
    if not isinstance(model, dict):
        raise TokenizerError(f"{source} has no tokenizer model (the \"model\" object is missing)")
    vocab = model.get("vocab")
    if not vocab:
        raise TokenizerError(f"{source} has no vocabulary (\"model.vocab\" is missing or empty)")
    return spec


def _byte_level_decoder(spec: dict[str, Any]) -> bool:
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return bool(parts) and all(p.get("type") == "ByteLevel" for p in parts)


def _without_first_prefix(spec: dict[str, Any]) -> dict[str, Any] | None:
    """`spec` with Metaspace's prepend_scheme "first" turned to "never", or None when it has
    none. Metaspace prefixes "▁" only to the text at offset 0 of the input; a piece of a
    chat encoded on its own (gpt/chat_template.py) that is not at the start must not get it."""
    spec = json.loads(json.dumps(spec))
    found = False
    pre = spec.get("pre_tokenizer") or {}
    for part in pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]:
        if part.get("type") == "Metaspace" and part.get("prepend_scheme") == "first":
            part["prepend_scheme"] = "never"
            found = True
    return spec if found else None


class HFTokenizer:
    """encode/decode through a model's own tokenizer.json (see the module docstring)."""

    def __init__(self, tokenizer_json: str, settings: HFTokenizerSettings | None = None,
                 source: str = TOKENIZER_FILE, files: dict[str, str] | None = None) -> None:
        self.json = tokenizer_json
        self.settings = settings or HFTokenizerSettings()
        self.source = source
        self.files = dict(files or {})        # the settings files as read, written back by save()
        spec = check_tokenizer_json(tokenizer_json, source)
        try:
            self._backend = HFBackend.from_str(tokenizer_json)
            # The same tokenizer with special-token strings read as text: for ordinary text.
            self._plain = HFBackend.from_str(tokenizer_json)
            inner = _without_first_prefix(spec)
            self._plain_inner = HFBackend.from_str(json.dumps(inner)) if inner else self._plain
        except Exception as err:  # noqa: BLE001 - the library's errors are plain exceptions
            raise TokenizerError(f"{source} is not a tokenizer the `tokenizers` library reads: {err}") from None
        self._plain.encode_special_tokens = True
        self._plain_inner.encode_special_tokens = True
        self._has_post_processor = spec.get("post_processor") is not None

        added = self._backend.get_added_tokens_decoder()
        self.added_tokens = {t.content: t for t in added.values()}
        self.special_ids = {t.content: i for i, t in added.items() if t.special}
        self._special_set = frozenset(self.special_ids.values())
        vocab = self._backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1

        s = self.settings
        self.bos_token = s.bos_token
        self.bos_id = self._id_of(s.bos_token, "bos_token")
        if self.bos_id is None:
            self.bos_id = s.generation_bos_id
        eos_ids = list(s.generation_eos_ids)
        eos_token_id = self._id_of(s.eos_token, "eos_token")
        if eos_token_id is not None and eos_token_id not in eos_ids:
            eos_ids.append(eos_token_id)
        if not eos_ids:
            raise TokenizerError(f"{source}: no end-of-sequence token: set eos_token in tokenizer_config.json "
                                 "or eos_token_id in generation_config.json")
        bad = [i for i in eos_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"{source}: eos token ids {bad} are outside the vocabulary of {self.vocab_size}")
        self.eos_ids = eos_ids
        self._eos_token_id = eos_token_id
        pad = self._id_of(s.pad_token, "pad_token")
        self.pad_id = pad if pad is not None else eos_ids[0]
        self.chat_template = s.chat_template
        self._byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        self._byte_level = _byte_level_decoder(spec)
        self._pieces = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self.byte_piece_ids = frozenset(
            i for i in range(self.vocab_size)
            if self._byte_fallback and _BYTE_PIECE.fullmatch(self._backend.id_to_token(i) or "")
            and i not in self._special_set)
        self.concatenates_bytes = self._byte_level and self._bytes_agree()

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path) -> HFTokenizer:
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer missing: {path}")
        files = {name: (directory / name).read_text(encoding="utf-8")
                 for name in HF_TOKENIZER_FILES if (directory / name).is_file()}
        return cls(path.read_text(encoding="utf-8"), read_settings(directory), source=str(path), files=files)

    def save(self, directory: Path) -> Path:
        """tokenizer.json and the settings files it was loaded with, as they were."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        path.write_text(self.json, encoding="utf-8")
        for name, text in self.files.items():
            (directory / name).write_text(text, encoding="utf-8")
        return path

    def _id_of(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: the {name} {token!r} is not in the vocabulary")
        return token_id

    def _piece_bytes(self, token_id: int) -> bytes:
        """What token `token_id` stands for in the middle of a text."""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if piece in self.added_tokens:
            return piece.encode()
        if self._byte_level:
            raw = piece_bytes(piece)
            if raw is not None:
                return raw
        if self._byte_fallback:
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
        return piece.replace(_METASPACE, " ").encode()

    def _bytes_agree(self) -> bool:
        """Spot-check that decoding is the concatenation of token bytes (byte-level BPE)."""
        step = max(1, self.vocab_size // 257)
        sample = [i for i in range(0, self.vocab_size, step) if i not in self._special_set]
        for chunk in (sample[k:k + 8] for k in range(0, len(sample), 8)):
            if self._backend.decode(chunk) != self.decode_bytes(chunk).decode("utf-8", errors="replace"):
                return False
        return True

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """As transformers' `tokenizer(text)`: special tokens parsed, BOS/EOS added by
        tokenizer.json's post-processor (transformers 5 ignores tokenizer_config.json's
        add_bos_token/add_eos_token when tokenizer.json exists). Without a post-processor,
        the flags say, as transformers 4's update_post_processor read them (5 adds nothing)."""
        if self._has_post_processor:
            return self._backend.encode(text, add_special_tokens=True).ids
        add_bos, add_eos = self.settings.add_bos_eos or (False, False)
        ids = self._backend.encode(text, add_special_tokens=False).ids
        bos = self._id_of(self.bos_token, "bos_token")
        if add_bos and bos is not None:
            ids = [bos, *ids]
        if add_eos and self._eos_token_id is not None:
            ids = [*ids, self._eos_token_id]
        return ids

    def encode_marked(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Rendered chat text with special-token strings read as special tokens, nothing
        added: ids and each token's character span (what apply_chat_template encodes)."""
        enc = self._backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_piece(self, text: str, at_start: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """A piece of rendered chat text, special-token strings read as text; `at_start`
        says whether the piece opens the text (metaspace prefixes only that one)."""
        enc = (self._plain if at_start else self._plain_inner).encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    # --- decoding -------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        pieces = self._pieces
        return b"".join(pieces[i] for i in ids if 0 <= i < len(pieces))

    def special(self, token: str) -> int:
        return self.special_ids[token]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_set

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry or added token, None when there is none."""
        return self._backend.token_to_id(token)
