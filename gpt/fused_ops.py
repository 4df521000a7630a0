"""The model's elementwise steps as fused CPU kernels at inference (gpt/csrc/fused_ops.cpp).

A layer's RMSNorms, rotary embedding and SiLU-gated product are chains of small PyTorch
ops: about 25 a layer, each reading and writing the whole activation (and, in bf16,
converting it to float and back). They took half of a bf16 prefill of the `small` model
(64 prompts x 128 tokens, 2 cores: mul, silu, pow, add, cat, copy 144 of 270 ms). The
kernels do each step in one pass over the data and round where the unfused ops round.

Only without autograd and on the CPU (the same condition as the prepacked linear layers,
gpt/linear.py): training's forward and backward, and CUDA, keep the PyTorch ops. Where the
kernels cannot be built the model keeps them too. `set_enabled(False)` turns the kernels
off for a process (A/B measurements, the equivalence tests).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt.cpp_extension import KernelLibrary

_LIBRARY = KernelLibrary("sol_fused_ops", Path(__file__).parent / "csrc" / "fused_ops.cpp", "sol_fused", "rms_norm")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_enabled = True


def available(arch: str = "native") -> bool:
    """Build or load the kernels once per process (for the first `arch` asked)."""
    return _LIBRARY.available(arch)


def set_enabled(enabled: bool) -> bool:
    """Use the kernels where they apply (default) or never; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def applies(x: torch.Tensor) -> bool:
    """Whether the fused kernels compute `x`'s elementwise steps."""
    return (_enabled and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in _DTYPES
            and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, last dim) + eps), normalised in float32."""
    return torch.ops.sol_fused.rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for gate and up side by side on the last dimension."""
    return torch.ops.sol_fused.silu_mul(gate_up)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """Rotate the first `heads` heads of each row of x (rows, >= heads * head_dim) in
    place, half-split layout; cos and sin (rows, head_dim) for each row's position."""
    torch.ops.sol_fused.rope_(x, cos, sin, heads, head_dim)
