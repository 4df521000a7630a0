"""The reward model's score: scalar head at the last token plus a learned multiple of the
backbone's log-likelihood of the reply tokens only."""

from __future__ import annotations

import torch

from tests.conftest import make_tiny_model
from training.heads import REWARD_HEAD, RewardModel
from training.stages.reward import reply_ids, score_batch


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
