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


def _skip_unless_onednn_runs(dtype: torch.dtype) -> None:
    if not linear_mod._onednn_supports(dtype):
        pytest.skip(f"oneDNN cannot run {dtype} on this CPU (bf16 needs avx512_bf16 or AMX)")


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


def _group(dtype=torch.float32) -> tuple[Linear, ...]:
    torch.manual_seed(1)
    return tuple(Linear(96, n, bias=False).to(dtype) for n in (64, 32, 32))


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_equals_the_layers_side_by_side(dtype):
    _skip_unless_onednn_runs(dtype)
    layers = _group(dtype)
    x = torch.randn(3, 7, 96).to(dtype)
    with torch.inference_mode():
        fused = linear_mod.fused_projection(layers, x)
    want = torch.cat([F.linear(x.float(), layer.weight.float()) for layer in layers], dim=-1)
    assert fused is not None and fused.shape == (3, 7, 128) and fused.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert torch.allclose(fused.float(), want, atol=tol, rtol=tol)


@needs_onednn
@pytest.mark.parametrize("fused", [False, True], ids=["linear", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_the_same_whatever_the_batch(dtype, fused):
    """Batch invariance: a row's output does not depend on the rows beside it (one layer,
    and a fused group of projections)."""
    _skip_unless_onednn_runs(dtype)
    if fused:
        layers = _group(dtype)

        def project(x):
            return linear_mod.fused_projection(layers, x)
    else:
        project = _layer(dtype)
    x = torch.randn(300, 96).to(dtype)
    with torch.inference_mode():
        full = project(x)
        for rows in (1, 2, 3, 5, 8, 9, 64):
            assert torch.equal(project(x[:rows]), full[:rows]), rows


@needs_onednn
def test_fused_projection_follows_updates_and_leaves_training_alone():
    layers = _group()
    x = torch.randn(16, 96)
    with torch.no_grad():
        before = linear_mod.fused_projection(layers, x)
        layers[2].weight.mul_(2.0)             # one member updated in place (an optimizer step)
        after = linear_mod.fused_projection(layers, x)
    assert torch.allclose(after[:, :96], before[:, :96], atol=1e-6)
    assert torch.allclose(after[:, 96:], 2 * before[:, 96:], atol=1e-4, rtol=1e-5)
    # With autograd on there is no fused path: the caller runs the layers one by one.
    assert linear_mod.fused_projection(layers, x) is None
    with torch.inference_mode():
        # Biases on some members only: not fused.
        assert linear_mod.fused_projection((Linear(96, 8, bias=True), Linear(96, 8, bias=False)), x) is None


@needs_onednn
def test_fused_projection_adds_each_members_bias_and_follows_its_updates():
    torch.manual_seed(1)
    layers = (Linear(96, 64, bias=True), Linear(96, 32, bias=True), Linear(96, 32, bias=True))
    x = torch.randn(5, 96)
    with torch.no_grad():
        for layer in layers:
            layer.bias.uniform_(-1, 1)
        got = linear_mod.fused_projection(layers, x)
        assert torch.allclose(got, torch.cat([F.linear(x, la.weight, la.bias) for la in layers], -1), atol=1e-5)
        layers[1].bias.add_(3.0)               # in place, as load_state_dict or an optimizer would
        again = linear_mod.fused_projection(layers, x)
    assert torch.allclose(again[:, 64:96], got[:, 64:96] + 3.0, atol=1e-5)
    assert torch.equal(again[:, :64], got[:, :64])
