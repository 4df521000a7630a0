"""The model's Linear: the prepacked CPU inference path equals F.linear, follows in-place
weight updates, and leaves training, state dicts and copies as nn.Linear has them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gpt import linear as linear_mod
from gpt.linear import Linear

needs_onednn = pytest.mark.skipif(not linear_mod._onednn_supports(torch.float32),
                                  reason="PyTorch was built without oneDNN")


def _layer(dtype=torch.float32) -> Linear:
    torch.manual_seed(0)
    return Linear(96, 160, bias=False).to(dtype)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 8, 64, 300])
def test_packed_path_equals_f_linear(rows):
    layer = _layer()
    x = torch.randn(2, rows, 96)
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x, layer.weight)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert layer in linear_mod._packed


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_the_same_whatever_the_batch(dtype):
    """Batch invariance: a row's output does not depend on the rows beside it."""
    if not linear_mod._onednn_supports(dtype):
        pytest.skip(f"oneDNN cannot run {dtype} on this CPU (bf16 needs avx512_bf16 or AMX)")
    layer = _layer(dtype)
    x = torch.randn(300, 96).to(dtype)
    with torch.inference_mode():
        full = layer(x)
        for rows in (1, 2, 3, 5, 8, 9, 64):
            assert torch.equal(layer(x[:rows]), full[:rows]), rows


@pytest.mark.skipif(not linear_mod._onednn_supports(torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_packed_path_bf16():
    layer = _layer(torch.bfloat16)
    x = torch.randn(64, 96).to(torch.bfloat16)
    with torch.inference_mode():
        got = layer(x).float()
    want = F.linear(x.float(), layer.weight.float())
    assert torch.allclose(got, want, atol=0.1, rtol=0.02)


@needs_onednn
def test_in_place_update_is_seen_by_the_next_call():
    layer = _layer()
    x = torch.randn(16, 96)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2.0)                 # as an optimizer step would, in place
        after = layer(x)
        layer.weight.copy_(torch.zeros_like(layer.weight))   # as load_state_dict would
        zero = layer(x)
    assert torch.allclose(after, 2 * before, atol=1e-4, rtol=1e-5)
    assert not zero.any()


@needs_onednn
def test_training_keeps_autograd_and_copies_carry_no_packed_weights():
    layer = _layer()
    x = torch.randn(16, 96)
    with torch.inference_mode():
        layer(x)
    out = layer(x)                              # grad enabled: F.linear, differentiable
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert set(layer.state_dict()) == {"weight"}
    twin = copy.deepcopy(layer)
    assert twin not in linear_mod._packed
    with torch.inference_mode():
        assert torch.allclose(twin(x), F.linear(x, layer.weight), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_a_layer_made_under_inference_mode():
    with torch.inference_mode():
        layer = _layer()
        x = torch.randn(16, 96)
        assert torch.allclose(layer(x), F.linear(x, layer.weight), atol=1e-5, rtol=1e-5)
