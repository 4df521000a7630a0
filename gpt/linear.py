"""The model's linear layer: nn.Linear, plus a CPU inference path through oneDNN with the
weight prepacked.

On CPUs where PyTorch's fp32 matmul goes through MKL's generic code path (measured on
this project's AMD EPYC machines), oneDNN's prepacked linear computes the same fp32
products 2.3x faster (64 x 384 x 1024: 470 -> 197 us, one thread) and bf16 ones ~10%
faster; vLLM's CPU build prepacks its weights for the same reason. Prepacking copies
the weight into oneDNN's blocked layout, so it is done once and reused while the weight
is unchanged: the copy is keyed on the weight's storage and version counter, which every
in-place update bumps (an optimizer step, `load_state_dict`), so a training policy that
the engine samples from is repacked after each update instead of going stale.

Only without autograd (inference mode or no_grad) and on the CPU: training's forward and
backward stay on `F.linear`. The packed copies live beside the modules (a weak mapping),
not in them, so state dicts, checkpoints and deep copies never see them.

Projections that read the same input (a layer's query/key/value, the MLP's gate/up) are
packed as one concatenated weight and computed by one call (`fused_projection`): at a
few rows a oneDNN call costs ~18 us whatever its size (bf16, measured on an AMX Xeon),
so a decode step of 2 sequences spent half its time in the 43 linear calls of the
`small` model; fused, a layer makes 4 calls instead of 7.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

_PACKABLE = (torch.float32, torch.bfloat16)
# The batch size oneDNN tunes a packed layout for; any number of rows is accepted.
_BATCH_HINT = 64
_packed: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[int, int, torch.dtype], torch.Tensor]] = (
    weakref.WeakKeyDictionary())
_support: dict[torch.dtype, bool] = {}


def _onednn_supports(dtype: torch.dtype) -> bool:
    if dtype not in _support:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        if ok and dtype == torch.bfloat16:
            ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        _support[dtype] = ok
    return _support[dtype]


def _weight_key(w: torch.Tensor) -> tuple[int, int, torch.dtype]:
    # A weight made under inference mode has no version counter; such a weight can only
    # change inside inference mode, which no training step is.
    return (w.data_ptr(), -1 if w.is_inference() else w._version, w.dtype)


def _packed_weight(layer: nn.Linear) -> torch.Tensor:
    w = layer.weight
    key = _weight_key(w)
    hit = _packed.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _BATCH_HINT)
    _packed[layer] = (key, packed)
    return packed


def _packed_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in _PACKABLE
            and x.dtype == weight.dtype and _onednn_supports(x.dtype))


# The first layer of a fused group -> (every member's weight and bias key, the packed
# concatenated weight, the concatenated bias or None).
_fused: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor, torch.Tensor | None]] = (
    weakref.WeakKeyDictionary())


def fused_projection(layers: tuple[nn.Linear, ...], x: torch.Tensor) -> torch.Tensor | None:
    """x through every layer of `layers` (same input size; all with a bias or none: Qwen2's
    query/key/value) in one oneDNN call: their outputs side by side on the last dim, each
    with its own bias added. None where the prepacked path does not apply (autograd on,
    another device or dtype, biases on some members only): the caller then runs the layers
    one by one. The packed concatenation follows in-place updates of any member's weight
    or bias, as Linear's does."""
    first = layers[0]
    has_bias = [layer.bias is not None for layer in layers]
    if not _packed_path(x, first.weight) or (any(has_bias) and not all(has_bias)):
        return None
    key = tuple(_weight_key(t) for layer in layers for t in (layer.weight, layer.bias) if t is not None)
    hit = _fused.get(first)
    if hit is None or hit[0] != key:
        weight = torch.cat([layer.weight.detach() for layer in layers])
        bias = torch.cat([layer.bias.detach() for layer in layers]) if has_bias[0] else None
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT), bias)
        _fused[first] = hit
    return torch.ops.mkldnn._linear_pointwise(x, hit[1], hit[2], "none", [], "")


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) with the prepacked inference path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _packed_path(x, self.weight):
            # Every batch size takes this path, a lone row too (28 us against F.linear's 20
            # at 1 x 384 x 1024): its rows come out bit for bit the same whatever the batch
            # (tests/core/test_linear.py), which MKL's fp32 path does not give (it differs at
            # 1, 2, 3, 5 and 9 rows of 384 -> 1024).
            return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(self), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
