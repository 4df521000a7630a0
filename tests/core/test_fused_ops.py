"""The model's fused CPU kernels (gpt/csrc/fused_ops.cpp) against the PyTorch ops they
replace: RMSNorm, SiLU-gated product and rotary embedding, in float32 and bfloat16, and
the whole model with the kernels on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt import fused_ops
from gpt.config import preset
from gpt.model import GPT, RMSNorm, RotaryEmbedding, apply_rope

pytestmark = pytest.mark.skipif(not fused_ops.available(), reason="needs a C++ compiler and ninja to build the fused kernels")

DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # float32: summation order and the exp polynomial; bf16: at most one unit in the last
    # place where a float32 difference crosses a rounding boundary.
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rms_norm_equals_the_module(dtype, rows):
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(rows, 96) * 4).to(dtype)
    previous = fused_ops.set_enabled(False)
    try:
        with torch.no_grad():
            want = norm(x)
    finally:
        fused_ops.set_enabled(previous)
    got = fused_ops.rms_norm(x, norm.weight.detach(), 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_silu_times_up(dtype):
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 7, 2 * 80) * 6).to(dtype)   # large |x| too: exp must not overflow
    gate, up = gate_up.chunk(2, dim=-1)
    got = fused_ops.silu_mul(gate_up)
    assert got.shape == (3, 7, 80)
    _close(got, F.silu(gate) * up, dtype)
    if dtype == torch.bfloat16:
        # Every bf16 intermediate rounds where the unfused ops round.
        assert (got != F.silu(gate) * up).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_rotates_only_the_given_heads(dtype):
    torch.manual_seed(0)
    rows, heads, extra, head_dim = 9, 5, 2, 16
    x = torch.randn(rows, (heads + extra) * head_dim).to(dtype)
    cos, sin = RotaryEmbedding(head_dim, 10000.0, rows + 40)(torch.arange(rows)[None] + 40, dtype)
    cos, sin = cos.reshape(rows, head_dim), sin.reshape(rows, head_dim)
    want = apply_rope(x[:, :heads * head_dim].view(rows, heads, head_dim).transpose(0, 1), cos, sin)
    got = x.clone()
    fused_ops.rope_(got, cos, sin, heads, head_dim)
    _close(got[:, :heads * head_dim].view(rows, heads, head_dim).transpose(0, 1), want, dtype)
    assert torch.equal(got[:, heads * head_dim:], x[:, heads * head_dim:])    # values untouched


def test_bad_shapes_are_refused():
    x = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="even"):
        fused_ops.silu_mul(torch.randn(4, 31))
    with pytest.raises(RuntimeError, match="rows, head_dim"):
        fused_ops.rope_(x, torch.randn(3, 16), torch.randn(3, 16), 2, 16)
    with pytest.raises(RuntimeError, match="weight"):
        fused_ops.rms_norm(x, torch.ones(31), 1e-5)


def test_kernels_apply_only_without_autograd_on_the_cpu():
    x = torch.randn(2, 8)
    assert not fused_ops.applies(x)                 # grad mode on: training keeps PyTorch's ops
    with torch.no_grad():
        assert fused_ops.applies(x)
        assert not fused_ops.applies(x.to(torch.int64))
    previous = fused_ops.set_enabled(False)
    try:
        with torch.no_grad():
            assert not fused_ops.applies(x)
    finally:
        fused_ops.set_enabled(previous)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_logits_equal_with_and_without_the_kernels(dtype):
    torch.manual_seed(0)
    model = GPT(preset("tiny")).to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.inference_mode():
        fused = model(ids).float()
        previous = fused_ops.set_enabled(False)
        try:
            plain = model(ids).float()
        finally:
            fused_ops.set_enabled(previous)
    if dtype == torch.float32:
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    else:
        # bf16 logits of a random model: rounding differences may grow through the layers,
        # so the check is on the greedy choice and a loose bound.
        assert (fused.argmax(-1) == plain.argmax(-1)).float().mean() > 0.97
        torch.testing.assert_close(fused, plain, rtol=0.05, atol=0.05)
