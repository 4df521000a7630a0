"""Rotary frequencies: the inverse frequency of each pair of a head's dimensions, by the
config's rope scaling type.

Computed in float32, as the tables built from them are (gpt/model.py RotaryEmbedding),
so that a checkpoint trained with a scaling type rotates exactly as its trainer did.
"""

from __future__ import annotations

import math

import torch

from gpt.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """(head_dim / 2,) float32: theta ** (-2i / head_dim), then scaled."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        # Positions divided by the factor; the same as dividing every frequency by it.
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    raise ValueError(f"unsupported rope type {scaling.rope_type!r}")


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's scaling by wavelength: a dimension pair whose wavelength is longer than
    original / low_freq_factor is slowed by `factor` (it never completed a turn within the
    pretraining context); one shorter than original / high_freq_factor is kept; in between
    the two are mixed, linearly in original / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    long_limit = s.original_max_positions / s.low_freq_factor
    short_limit = s.original_max_positions / s.high_freq_factor
    slowed = inv_freq / s.factor
    out = torch.where(wavelength > long_limit, slowed, inv_freq)
    mix = (s.original_max_positions / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    between = (wavelength <= long_limit) & (wavelength >= short_limit)
    return torch.where(between, (1 - mix) * slowed + mix * inv_freq, out)
