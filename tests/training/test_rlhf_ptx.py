"""PPO-ptx: the RLHF minibatch loss plus `ptx_coef` times the demonstrations' language-model
loss, computed in one forward with the rollouts (right padding leaves both unchanged)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model
from training.data.tasks import sample_problems
from training.heads import PolicyWithValue, RewardModel
from training.loop import LoopConfig
from training.stages.rlhf import RLHFConfig, RLHFStage
from training.stages.sft import assistant_lm_loss


def _stage(tokenizer, ptx_coef: float, demonstrations=None) -> tuple[RLHFStage, PolicyWithValue]:
    policy = PolicyWithValue(make_tiny_model(tokenizer, seed=5))
    reference = make_tiny_model(tokenizer, seed=5)
    rm = RewardModel(make_tiny_model(tokenizer, seed=6))
    problems = sample_problems(4, "train", seed=0, families=["add", "sort"]).problems
    cfg = RLHFConfig(LoopConfig(batch_size=4, seed=3), rollouts=8, samples_per_prompt=2, max_new_tokens=4,
                     ptx_coef=ptx_coef, ptx_batch_size=3)
    return RLHFStage(policy, reference, rm, tokenizer, problems, cfg, demonstrations=demonstrations), policy


def test_ptx_adds_the_demonstrations_language_model_loss(tiny_tokenizer):
    demos = [p.conversation() for p in sample_problems(5, "train", seed=1, families=["reverse"]).problems]
    stage, policy = _stage(tiny_tokenizer, ptx_coef=0.5, demonstrations=demos)
    rollout, rows, batch_demos, _ = stage.micro_batch(0, 0, 0, 1)
    assert batch_demos is not None and batch_demos[0].shape[0] == 3
    policy.eval()   # no dropout: the three forwards below must see the same model
    with torch.no_grad():
        with_ptx, stats = stage.loss(policy, (rollout, rows, batch_demos))
        without, _ = stage.loss(policy, (rollout, rows, None))
        inputs, targets, weight = batch_demos
        assert weight == 1.0      # one process: its mean is the global one
        alone = assistant_lm_loss(policy.gpt(inputs), targets).item()
    assert stats["ptx_loss"] == pytest.approx(alone, rel=1e-4)
    assert with_ptx.item() == pytest.approx(without.item() + 0.5 * alone, rel=1e-4)
    # The draw is a pure function of the step: a resumed run sees the same demonstrations.
    again = stage.micro_batch(0, 0, 0, 1)[2]
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    assert not torch.equal(stage.micro_batch(1, 0, 0, 1)[2][0], inputs)


def test_ptx_off_draws_no_demonstrations(tiny_tokenizer):
    stage, _ = _stage(tiny_tokenizer, ptx_coef=0.0)
    assert stage.micro_batch(0, 0, 0, 1)[2] is None


def test_ptx_needs_demonstrations(tiny_tokenizer):
    with pytest.raises(ValueError, match="demonstrations"):
        _stage(tiny_tokenizer, ptx_coef=1.0)
