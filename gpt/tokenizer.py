"""Byte-level BPE: trained with the `tokenizers` library, served through `tiktoken`.

The trained `tokenizer.json` is the stored form (it is also what Hugging Face loads);
at serving time its merges become a `tiktoken.Encoding`. Token ids are the trainer's ids,
so both encoders give the same ids (a test checks it on held-out text).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Special tokens, fixed ids 0..N-1 in every sol tokenizer. <|endoftext|> opens and closes
# documents; the chat roles open a turn and <|end|> closes it.
ENDOFTEXT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (ENDOFTEXT, SYSTEM, USER, ASSISTANT, END_OF_TURN)

# GPT-4 style split, except that digits are split one by one: small models learn
# arithmetic far better when every digit is its own token.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TOKENIZER_FILE = "tokenizer.json"


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-unicode table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class SolTokenizer:
    """Encode/decode with tiktoken; knows the special tokens and the stored JSON form."""

    def __init__(self, tokenizer_json: str, name: str = "sol-bpe") -> None:
        self.json = tokenizer_json
        spec = json.loads(tokenizer_json)
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError("unsupported tokenizer: only byte-level BPE tokenizer.json files are supported")
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special", True)}
        missing = [t for t in SPECIAL_TOKENS if t not in specials]
        if missing:
            raise ValueError(f"unsupported tokenizer: missing special tokens {missing}")
        decode_byte = _byte_decoder()
        ranks: dict[bytes, int] = {}
        try:
            for token, idx in model["vocab"].items():
                if token not in specials:
                    ranks[bytes(decode_byte[ch] for ch in token)] = idx
        except KeyError as err:
            raise ValueError("unsupported tokenizer: vocabulary is not byte-level BPE") from err
        if len(ranks) < 256:
            raise ValueError("unsupported tokenizer: the vocabulary lacks the 256 single bytes")
        self.special_ids = specials
        self.encoding = tiktoken.Encoding(
            name=name, pat_str=_split_pattern(spec), mergeable_ranks=ranks, special_tokens=specials
        )
        self.vocab_size = max(max(ranks.values()), max(specials.values())) + 1
        self.eot_id = specials[ENDOFTEXT]
        self.end_of_turn_id = specials[END_OF_TURN]

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings inside the text are ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def special(self, token: str) -> int:
        return self.special_ids[token]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids.values()

    # --- storage --------------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(self.json, encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> SolTokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer missing: {path}")
        return cls(path.read_text(encoding="utf-8"))

    def hf_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_str(self.json)

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Compression on `texts`: UTF-8 bytes per token (higher packs more text per step)."""
        texts = list(texts)
        tokens = sum(len(ids) for ids in self.encode_batch(texts))
        return sum(len(t.encode()) for t in texts) / max(1, tokens)


def _split_pattern(spec: dict) -> str:
    """The pre-tokenizer regex stored in tokenizer.json (ours, or GPT-2's for plain ByteLevel)."""
    gpt2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern", {})
            if "Regex" in pattern:
                return pattern["Regex"]
        if part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return gpt2
    raise ValueError("unsupported tokenizer: no byte-level pre-tokenizer regex found")


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> SolTokenizer:
    """Train a byte-level BPE on `texts`; special tokens take ids 0..4."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1}")
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=show_progress,
    )
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    return SolTokenizer(tok.to_str())


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Split very long documents so the trainer's per-item work stays bounded."""
    for text in texts:
        for start in range(0, len(text), size):
            yield text[start:start + size]


def load_tokenizer(directory: Path) -> SolTokenizer:
    """The tokenizer stored in a checkpoint (or Hugging Face) directory. Only sol's own
    byte-level BPE is read here; a directory with another tokenizer is refused."""
    return SolTokenizer.load(directory)
