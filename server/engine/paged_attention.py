"""The CPU attention kernel that reads the paged KV pool in place (csrc/paged_attention.cpp).

The portable path gathers each sequence's blocks into padded copies in every layer and
runs scaled-dot-product attention on them; on the CPU that gather was a third of a decode
step. This kernel walks the block tables instead. It is compiled on first use, for the
machine it runs on or EngineConfig.kernel_arch (gpt/cpp_extension.py); where it cannot be
built the engine keeps the portable path and says so once in the log. CUDA always takes
the portable path (SDPA).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt.cpp_extension import KernelLibrary

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
_LIBRARY = KernelLibrary("sol_paged_attention", SOURCE, "sol_paged", "paged_attention")


def available(arch: str = "native") -> bool:
    """Build or load the kernel once per process (for the first `arch` asked); False,
    logged once, if that fails."""
    return _LIBRARY.available(arch)


ATTENTION_CHOICES = ("auto", "in-place", "gather")


def use_in_place(setting: str, device: torch.device, arch: str = "native") -> bool:
    """Resolve EngineConfig.attention: "auto" takes the kernel on the CPU where it builds;
    "in-place" insists on it; "gather" is the portable path (the one CUDA runs)."""
    if setting not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, not {setting!r}")
    if setting == "gather" or device.type != "cpu":
        if setting == "in-place":
            raise ValueError("the in-place paged attention kernel runs on the CPU only")
        return False
    if available(arch):
        return True
    if setting == "in-place":
        raise RuntimeError("the in-place paged attention kernel could not be built (see the log)")
    return False


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    tokens: torch.Tensor, row_of_token: torch.Tensor, positions: torch.Tensor,
                    block_tables: torch.Tensor, scale: float) -> None:
    """Fill out[t] for each t in `tokens`: query q[t] (H, D) attends to positions
    0..positions[t] of its row's sequence, read through block_tables[row_of_token[t]]
    from the pools: keys (blocks, kv_heads, head_dim, block_size), values (blocks,
    kv_heads, block_size, head_dim)."""
    torch.ops.sol_paged.paged_attention(out, q, k_pool, v_pool, tokens, row_of_token, positions,
                                        block_tables, scale)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store new keys and values (kv_heads, tokens, head_dim), any strides, in their pool
    slots (block * block_size + position), in the pools' layouts (see paged_attention)."""
    torch.ops.sol_paged.write_kv(k_pool, v_pool, k, v, slots)
