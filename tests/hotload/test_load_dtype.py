"""The dtype a served version loads and serves in (issue 35: weights as users have them):
without --dtype a bf16 checkpoint serves in bf16, never through an fp32 copy; with --dtype
the checkpoint is read straight into that dtype."""

from __future__ import annotations

import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.model import GPT
from gpt.registry import publish_checkpoint
from server.engine.config import EngineConfig
from server.models.manager import EngineBuilder, ModelManager
from tests.conftest import make_tiny_model


def _spy_model_copies(monkeypatch) -> list:
    """Every deep copy of a whole model (the engine's conversion to its dtype) made from now on."""
    import copy

    real, copies = copy.deepcopy, []

    def spy(x, memo=None, _nil=[]):  # noqa: B006 - copy.deepcopy's own signature
        if isinstance(x, GPT):
            copies.append(x)
        return real(x, memo, _nil)

    monkeypatch.setattr(copy, "deepcopy", spy)
    return copies


def _served(registry, tokenizer, stored: torch.dtype, flag: torch.dtype | None):
    model = make_tiny_model(tokenizer).to(stored)
    resolved = publish_checkpoint(registry, "m", model, tokenizer, {"stage": "base"})
    assert next(load_checkpoint(resolved.path, dtype=None).model.parameters()).dtype == stored
    manager = ModelManager(registry, EngineBuilder(EngineConfig(num_blocks=64, block_size=8, device="cpu",
                                                                dtype=flag)))
    try:
        engine = manager.load("m").engine
        return {p.dtype for p in engine.model.parameters()}, engine.cache.pool.dtype, engine
    finally:
        manager.shutdown()


def test_a_bf16_checkpoint_serves_in_bf16_without_dtype(registry, tiny_tokenizer, monkeypatch):
    copies = _spy_model_copies(monkeypatch)
    dtypes, pool, _ = _served(registry, tiny_tokenizer, torch.bfloat16, None)
    assert dtypes == {torch.bfloat16} and pool == torch.bfloat16
    assert copies == []


@pytest.mark.parametrize(("stored", "flag"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_dtype_flag_wins_and_is_read_straight_in(registry, tiny_tokenizer, monkeypatch, stored, flag):
    copies = _spy_model_copies(monkeypatch)
    dtypes, pool, _ = _served(registry, tiny_tokenizer, stored, flag)
    assert dtypes == {flag} and pool == flag
    assert copies == [], "the checkpoint was loaded in another dtype and copied"


def test_an_fp32_checkpoint_serves_in_the_devices_default(registry, tiny_tokenizer):
    dtypes, pool, _ = _served(registry, tiny_tokenizer, torch.float32, None)
    assert dtypes == {torch.float32} and pool == torch.float32
