"""The scalar heads: the reward model's score (scalar head at the last token plus a learned
multiple of the backbone's log-likelihood of the reply tokens only), its optional language
model loss, and the PPO value head's detached features."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model
from training.data.tasks import PreferencePair, sample_problems
from training.heads import REWARD_HEAD, PolicyWithValue, RewardModel
from training.stages.reward import RewardConfig, RewardStage, reply_ids, score_batch


def test_reward_score_is_head_plus_weighted_reply_likelihood(tiny_tokenizer):
    gpt = make_tiny_model(tiny_tokenizer, seed=2)
    rm = RewardModel(gpt)
    with torch.no_grad():
        rm.head.weight.normal_()
        rm.head.bias.fill_(0.5)
        rm.lm_weight.fill_(0.7)
    seqs = [reply_ids(tiny_tokenizer, "What is 2 + 3?", "5"), reply_ids(tiny_tokenizer, "Sort: 3, 1", "1, 3")]
    ids, last, start = score_batch(seqs, tiny_tokenizer.eot_id, torch.device("cpu"))
    with torch.no_grad():
        scores = rm(ids, last, start)
        for i, (seq, begin) in enumerate(seqs):
            x = torch.tensor([seq])
            hidden = gpt.hidden_states(x)[0]
            logp = torch.log_softmax(gpt(x)[0].float(), -1)
            likelihood = sum(logp[t - 1, seq[t]].item() for t in range(begin, len(seq)))
            expected = (hidden[-1] @ rm.head.weight[0]).item() + 0.5 + 0.7 * likelihood
            assert abs(scores[i].item() - expected) < 1e-4
    restored = RewardModel.from_parts(gpt, rm.heads())
    assert restored.lm_weight.item() == rm.lm_weight.item()
    assert set(rm.heads()) == {f"{REWARD_HEAD}.weight", f"{REWARD_HEAD}.bias", f"{REWARD_HEAD}.lm_weight"}


def test_reward_loss_adds_the_chosen_replies_language_model_loss(tiny_tokenizer):
    """lm_coef adds the mean per-token NLL of the chosen replies to the pairwise loss."""
    gpt = make_tiny_model(tiny_tokenizer, seed=3)
    rm = RewardModel(gpt)
    problem = sample_problems(1, "train", seed=0, families=["add"]).problems[0]
    pairs = [PreferencePair(problem, problem.answer, problem.answer + "1")]
    plain = RewardStage(tiny_tokenizer, pairs, RewardConfig(center_coef=0.0))
    with_lm = RewardStage(tiny_tokenizer, pairs, RewardConfig(center_coef=0.0, lm_coef=0.5))
    batch = plain.micro_batch(0, 0, 0, 1)
    with torch.no_grad():
        base_loss, parts = plain.loss(rm, batch)
        lm_loss, _ = with_lm.loss(rm, batch)
        seq, begin = reply_ids(tiny_tokenizer, problem.prompt, problem.answer)
        logp = torch.log_softmax(gpt(torch.tensor([seq]))[0].float(), -1)
        nll = -sum(logp[t - 1, seq[t]].item() for t in range(begin, len(seq))) / (len(seq) - begin)
    assert parts["chosen_nll"] == pytest.approx(nll, rel=1e-5)
    assert lm_loss.item() == pytest.approx(base_loss.item() + 0.5 * nll, rel=1e-5)


def test_value_loss_does_not_reach_the_policy_trunk(tiny_tokenizer):
    policy = PolicyWithValue(make_tiny_model(tiny_tokenizer, seed=4))
    ids = torch.tensor([reply_ids(tiny_tokenizer, "What is 2 + 3?", "5")[0]])
    _, values = policy(ids)
    ((values - 1.0) ** 2).sum().backward()   # the head starts at zero
    assert policy.head.weight.grad is not None and policy.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.gpt.parameters())
