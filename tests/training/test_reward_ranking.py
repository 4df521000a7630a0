"""`reward_ranking`: the per-family statistics of how a reward model orders a policy's
samples, checked against hand-counted values with an oracle reward model."""

import random

import pytest
import torch
from torch import nn

from training import evaluate
from training.data.tasks import corrupt, sample_problems
from training.stages.reward import reply_ids


class TableRewardModel(nn.Module):
    """Scores exactly the (prompt, reply) sequences it was given, by table lookup."""

    def __init__(self, tokenizer, scores: dict[tuple[str, str], float]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))     # score_replies reads the device from here
        self.table = {tuple(reply_ids(tokenizer, p, r)[0]): s for (p, r), s in scores.items()}

    def forward(self, ids: torch.Tensor, last: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.table[tuple(row[:n + 1].tolist())] for row, n in zip(ids, last, strict=True)])


@pytest.fixture
def scenario(monkeypatch):
    add = sample_problems(2, "heldout", seed=3, families=["add"]).problems
    cmp_ = sample_problems(1, "heldout", seed=3, families=["compare"]).problems
    rng = random.Random(0)
    wrong = {p.key: [corrupt(p, rng), corrupt(p, rng) + "1"] for p in add + cmp_}
    for p in add + cmp_:
        assert all(not p.check(w) for w in wrong[p.key])
    a, b, c = add[0], add[1], cmp_[0]
    replies = {
        a.prompt: [a.answer, wrong[a.key][0], wrong[a.key][1], None],  # one right: a mixed problem
        b.prompt: [b.answer] * 4,                                          # all right
        c.prompt: [wrong[c.key][0]] * 4,                                   # all wrong
    }

    def fake_sampling(policy, tokenizer, prompts, samples_per_prompt, seed, *args, **kwargs):
        assert samples_per_prompt == 4
        return [replies[p] for p in prompts]

    # Sampling is replaced by fixed replies (the sampler has its own tests); scoring is real.
    monkeypatch.setattr(evaluate, "sample_replies", fake_sampling)
    problems = [a, b, c]
    return problems, replies


def _oracle(tokenizer, problems, replies, sign: float) -> TableRewardModel:
    scores = {}
    for p in problems:
        for i, r in enumerate(replies[p.prompt]):
            right = r is not None and p.check(r)
            scores[(p.prompt, r or "")] = sign * (1.0 if right else -1.0) + 0.01 * i
    return TableRewardModel(tokenizer, scores)


def test_an_oracle_reward_model_ranks_every_pair_right(tiny_tokenizer, tiny_model, scenario):
    problems, replies = scenario
    rm = _oracle(tiny_tokenizer, problems, replies, sign=1.0)
    out = evaluate.reward_ranking(tiny_model, rm, tiny_tokenizer, problems, 4, seed=0)
    assert out["add"] == {"sample_accuracy": 5 / 8, "mixed": 0.5, "pair_accuracy": 1.0, "best_of_n": 1.0}
    # No right sample at all: no pairs to order, and best-of-n cannot be right.
    assert out["compare"] == {"sample_accuracy": 0.0, "mixed": 0.0, "pair_accuracy": None, "best_of_n": 0.0}


def test_an_inverted_reward_model_ranks_every_pair_wrong(tiny_tokenizer, tiny_model, scenario):
    problems, replies = scenario
    rm = _oracle(tiny_tokenizer, problems, replies, sign=-1.0)
    out = evaluate.reward_ranking(tiny_model, rm, tiny_tokenizer, problems, 4, seed=0)
    # The mixed problem's top pick is now a wrong reply; the all-right problem's is still right.
    assert out["add"] == {"sample_accuracy": 5 / 8, "mixed": 0.5, "pair_accuracy": 0.0, "best_of_n": 0.5}
