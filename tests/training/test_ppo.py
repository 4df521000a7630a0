"""PPO, KL and reward-model arithmetic against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from training.ppo import (
    AdaptiveKLController,
    gae,
    kl_rewards,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from training.stages.reward import pairwise_loss


def test_pairwise_loss_matches_hand_values():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # Centring adds coef * mean((c + r)^2) = 0.1 * (9 + 1) / 2.
    assert pairwise_loss(chosen, rejected, 0.1).item() == pytest.approx(expected + 0.5, rel=1e-6)


def test_kl_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_rewards(torch.tensor([1.0, -2.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 1.0], [-0.1, -2.0, 0.0]]))


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: deltas 0+0.2-0.5=-0.3, 0+0.4-0.2=0.2, 1+0-0.4=0.6
    #        A2=0.6, A1=0.2+0.5*0.6=0.5, A0=-0.3+0.5*0.5=-0.05
    # Row 1 (length 2; the padded value 9 must not leak): deltas 0.5+1-1=0.5, 2+0-1=1
    #        A1=1, A0=0.5+0.5*1=1
    assert torch.allclose(adv, torch.tensor([[-0.05, 0.5, 0.6], [1.0, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.45, 0.7, 1.0], [2.0, 2.0, 0.0]]))


def test_gae_with_gamma_discounts():
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 1.0]]))


def test_whitening_uses_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = masked_whiten(x, mask)
    # mean 2, unbiased var 1 -> (-1, 0, 1), padding zeroed
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)
    assert masked_mean(x, mask).item() == pytest.approx(2.0)


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    out = policy_loss(new, old, adv, torch.ones(1, 3), clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
    # token 2: max(-2.2, -2.2) = -2.2 (inside the range)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, rel=1e-5)
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert out.approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)


def test_policy_loss_gradient_vanishes_when_clipped():
    new = torch.log(torch.tensor([[1.5]])).requires_grad_()
    policy_loss(new, torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1), clip=0.2).loss.backward()
    assert new.grad.abs().item() == 0.0


def test_value_loss_clips_around_old_values():
    new = torch.tensor([[1.0, 0.1]])
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0]])
    loss, frac = value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-1)^2=0, clipped (0.2-1)^2=0.64 -> 0.64; token 1: (0.1-1)^2=0.81 both
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, rel=1e-5)
    assert frac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=100)
    assert ctl.update(3.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))      # error 0.5 clipped to 0.2
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=100)
    assert ctl.update(1.8, 10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    fixed = AdaptiveKLController(0.1, target=None, horizon=100)
    assert fixed.update(50.0, 10) == 0.1
