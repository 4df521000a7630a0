"""Model configuration and the named size presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

ROPE_TYPES = ("default", "linear", "llama3")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched past the pretraining context (gpt/rope.py).

    "linear" divides every frequency by `factor`; "llama3" (Llama 3.1+) divides the low
    frequencies by `factor`, keeps the high ones and blends between them, by wavelength
    against `original_max_positions` / `low_freq_factor` and / `high_freq_factor`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported model config: rope type {self.rope_type!r} (sol implements "
                             f"{', '.join(ROPE_TYPES)})")
        if self.rope_type != "default" and self.factor <= 0:
            raise ValueError("unsupported model config: rope scaling factor must be positive")
        if self.rope_type == "llama3" and (self.original_max_positions < 1
                                          or not 0 < self.low_freq_factor < self.high_freq_factor):
            raise ValueError("unsupported model config: llama3 rope scaling needs original_max_positions >= 1 "
                             "and 0 < low_freq_factor < high_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention.

    The defaults are sol's own models (no biases, head_dim = d_model / n_heads). What the
    Hugging Face families add is configuration of this one decoder: Qwen2's query/key/
    value biases (`qkv_bias`), Llama's optional output bias (`o_bias`), Qwen3's per-head
    RMSNorm of queries and keys before rotary (`qk_norm`) and its free `explicit_head_dim`,
    Llama 3.1's rotary scaling (`rope_scaling`). `family` names the Hugging Face format the
    checkpoint came from and goes back to (gpt/hf_config.py); sol's own models are "llama".
"""

    vocab_size: int = 4096
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    d_ff: int = 1024
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    explicit_head_dim: int | None = None   # None: d_model // n_heads
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling = RopeScaling()
    family: str = "llama"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):    # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.explicit_head_dim is not None and (not isinstance(self.explicit_head_dim, int)
                                                   or self.explicit_head_dim < 1):
            problems.append(f"explicit_head_dim must be a positive integer or null, got {self.explicit_head_dim!r}")
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {FAMILIES}, got {self.family!r}")
        if not problems:
            if self.explicit_head_dim is None and self.d_model % self.n_heads:
                problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
            elif self.head_dim % 2:
                problems.append(f"head_dim {self.head_dim} must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            problems.append("rope_theta and norm_eps must be positive")
        if problems:
            raise ValueError("unsupported model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.d_model // self.n_heads

    def num_parameters(self) -> int:
        hd = self.head_dim
        attn = self.d_model * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += (hd * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0) + (
            self.d_model if self.o_bias else 0) + (2 * hd if self.qk_norm else 0)
        mlp = 3 * self.d_model * self.d_ff
        per_layer = attn + mlp + 2 * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + self.n_layers * per_layer + self.d_model + head

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unsupported model config: unknown fields {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# `tiny` is for tests; `small` is the CPU demo (about 11M parameters); the rest are for GPUs
# and are unverified on this project's CPU-only CI.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176,
                        max_seq_len=256),
    "small": ModelConfig(vocab_size=4096, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024,
                         max_seq_len=512),
    "medium": ModelConfig(vocab_size=8192, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048,
                          max_seq_len=1024),
    "large": ModelConfig(vocab_size=32768, d_model=1536, n_layers=24, n_heads=16, n_kv_heads=4, d_ff=4096,
                         max_seq_len=2048, rope_theta=500000.0, tie_embeddings=False),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
