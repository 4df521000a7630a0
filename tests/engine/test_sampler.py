"""The sampler draws from the intended distribution, row by row, independently of the batch."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.api import SamplingParams
from server.engine.sampler import derive_seed, sample, uniform_noise

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
DRAWS = 20000


def _chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test (survival function via the regularised
    upper incomplete gamma)."""
    support = expected_probs > 0
    assert int(observed[~support].sum()) == 0, "a token outside the allowed set was drawn"
    obs = observed[support].double()
    exp = expected_probs[support].double() * obs.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _intended(params: SamplingParams) -> torch.Tensor:
    """The reference distribution, computed the slow obvious way on one row."""
    z = LOGITS.double() / params.temperature
    probs = torch.softmax(z, -1)
    order = torch.argsort(probs, descending=True).tolist()
    keep = set(order)
    if params.top_n_sigma:
        sigma = float(((z - z.mean()) ** 2).mean().sqrt())
        keep &= {i for i in range(len(z)) if z[i] >= z.max() - params.top_n_sigma * sigma}
    if params.top_k:
        keep &= set(order[:params.top_k])
    if params.top_p < 1.0:
        kept_sorted = [i for i in order if i in keep]
        mass = torch.softmax(z[kept_sorted], -1).tolist()
        chosen, acc = [], 0.0
        for i, m in zip(kept_sorted, mass, strict=True):
            if acc >= params.top_p:
                break
            chosen.append(i)
            acc += m
        keep &= set(chosen)
    if params.min_p:
        sub = torch.full_like(z, float("-inf"))
        idx = sorted(keep)
        sub[idx] = z[idx]
        p = torch.softmax(sub, -1)
        keep &= {i for i in range(len(z)) if p[i] >= params.min_p * p.max()}
    mask = torch.zeros_like(z, dtype=torch.bool)
    mask[sorted(keep)] = True
    return torch.softmax(z.masked_fill(~mask, float("-inf")), -1)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_n_sigma=1.0),
    SamplingParams(temperature=1.5, top_n_sigma=2.0, top_k=4),
], ids=["t1", "t0.7", "topk3", "topp0.8", "minp0.2", "combined", "nsigma1", "nsigma2-topk4"])
def test_sampling_matches_intended_distribution(params):
    logits = LOGITS.repeat(DRAWS, 1)
    out = sample(logits, [params] * DRAWS, seeds=torch.arange(DRAWS) + 12345, steps=torch.zeros(DRAWS))
    counts = torch.bincount(out.token_ids, minlength=len(LOGITS))
    expected = _intended(params)
    assert _chi_square_p(counts, expected) > 1e-3, (counts / DRAWS, expected)
    # The reported log-prob is that of the distribution sampled from.
    assert torch.allclose(out.logprobs.double().exp(), expected[out.token_ids], atol=1e-5)


def test_noise_is_uniform():
    u = uniform_noise(torch.arange(200), torch.arange(200), 500).flatten()
    counts = torch.histc(u.float(), bins=20, min=0.0, max=1.0)
    assert _chi_square_p(counts, torch.full((20,), 1 / 20)) > 1e-3
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.5)] * 3
    out = sample(logits, params, seeds=list(range(6)), steps=[0] * 6)
    greedy = logits.argmax(-1)
    assert out.token_ids[0::2].tolist() == greedy[0::2].tolist()


def test_same_seed_same_draw_whatever_the_batch():
    torch.manual_seed(1)
    row = torch.randn(1, 100)
    mine = SamplingParams(temperature=1.0, top_k=40, top_p=0.95)
    alone = sample(row, [mine], seeds=[7], steps=[3]).token_ids.item()
    for batch_size in (2, 5, 17):
        others = torch.randn(batch_size - 1, 100)
        logits = torch.cat([others[: batch_size // 2], row, others[batch_size // 2:]])
        params = [SamplingParams(temperature=0.5 + 0.1 * i, top_k=i) for i in range(batch_size)]
        params[batch_size // 2] = mine
        seeds = list(range(100, 100 + batch_size))
        seeds[batch_size // 2] = 7
        steps = [0] * batch_size
        steps[batch_size // 2] = 3
        out = sample(logits, params, seeds=seeds, steps=steps)
        assert out.token_ids[batch_size // 2].item() == alone


def test_penalties_and_banned_tokens():
    logits = torch.zeros(3, 6)
    logits[:, 2] = 1.0
    params = [SamplingParams(temperature=0.0, presence_penalty=2.0),
              SamplingParams(temperature=0.0, frequency_penalty=0.6),
              SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    out = sample(logits, params, output_ids=[[2], [2, 2], [2]], prompt_ids=[[], [], []])
    # presence: 1 - 2 < 0; frequency: 1 - 1.2 < 0; repetition: 1 / 2 still the max.
    assert out.token_ids.tolist()[:2] != [2, 2]
    assert out.token_ids.tolist()[2] == 2
    banned = (torch.tensor([2]), torch.tensor([2]), torch.tensor([float("-inf")]))
    out = sample(logits, [SamplingParams(temperature=0.0)] * 3, bias=banned)
    assert out.token_ids.tolist()[2] != 2 and out.token_ids.tolist()[:2] == [2, 2]


def test_logit_bias_shifts_the_distribution_it_samples_from():
    torch.manual_seed(3)
    logits = torch.randn(3, 10)
    # Row 0: +5 on token 7 and -100 on token 1; row 2: a ban and a bias on the same token add up.
    rows, ids, values = torch.tensor([0, 0, 2, 2]), torch.tensor([7, 1, 4, 4]), \
        torch.tensor([5.0, -100.0, 3.0, float("-inf")])
    out = sample(logits, [SamplingParams(temperature=1.0)] * 3, seeds=[1, 2, 3], steps=[0] * 3,
                 bias=(rows, ids, values), num_logprobs=10)
    expected = logits.clone()
    expected[0, 7] += 5.0
    expected[0, 1] -= 100.0
    expected[2, 4] = float("-inf")
    ref = torch.log_softmax(expected, -1)
    got = torch.full_like(ref, float("-inf")).scatter(1, out.top_ids, out.top_logprobs)
    assert torch.allclose(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-5)
    assert out.token_ids[2].item() != 4
    # A large bias wins a greedy row; an unbiased row in the same batch is untouched.
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 2 + [SamplingParams(temperature=0.0)],
                    bias=(torch.tensor([1]), torch.tensor([3]), torch.tensor([100.0])))
    assert greedy.token_ids[1].item() == 3
    assert greedy.token_ids[0].item() == int(logits[0].argmax())


def test_top_logprobs_are_sorted_and_normalised():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    out = sample(logits, [SamplingParams(temperature=1.0)] * 4, seeds=[1, 2, 3, 4], steps=[0] * 4,
                 num_logprobs=5)
    assert out.top_ids.shape == (4, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert math.isclose(float(torch.log_softmax(logits, -1)[0].exp().sum()), 1.0, rel_tol=1e-5)


def test_choice_seeds_differ_and_repeat():
    assert derive_seed(5, 0) == derive_seed(5, 0)
    assert len({derive_seed(5, i) for i in range(8)}) == 8


def test_greedy_batches_without_logprobs_skip_the_softmax_and_pick_the_same_tokens():
    torch.manual_seed(4)
    logits = torch.randn(5, 50)
    params = [SamplingParams(temperature=0.0)] * 5
    fast = sample(logits, params, chosen_logprobs=False)
    full = sample(logits, params)
    assert torch.equal(fast.token_ids, full.token_ids)
    assert fast.logprobs.numel() == 0 and full.logprobs.shape == (5,)
    # A sampled row in the batch still needs the distribution: nothing is skipped.
    mixed = sample(logits, params[:4] + [SamplingParams(temperature=1.0)], seeds=[1] * 5, steps=[0] * 5,
                   chosen_logprobs=False)
    assert mixed.logprobs.shape == (5,)


def test_top_n_sigma_keeps_the_logits_near_the_largest_whatever_the_temperature():
    # mean 0.1875, population std ~1.25: within 1 sigma of 2.0 are 2.0, 1.5 and 1.0.
    for temperature in (0.3, 1.0, 2.0):
        out = sample(LOGITS.repeat(4000, 1), [SamplingParams(temperature=temperature, top_n_sigma=1.0)] * 4000,
                     seeds=torch.arange(4000), steps=torch.zeros(4000))
        assert set(out.token_ids.tolist()) == {0, 1, 2}, temperature


def test_top_n_sigma_ignores_tokens_already_banned():
    # A banned token (-inf from a bias or a grammar) must not turn the deviation into NaN
    # and drop every token: the kept set is computed over the allowed ones.
    logits = torch.tensor([[3.0, 2.9, 0.0, float("-inf")]]).repeat(2000, 1)
    out = sample(logits, [SamplingParams(temperature=1.0, top_n_sigma=0.5)] * 2000,
                 seeds=torch.arange(2000), steps=torch.zeros(2000))
    assert set(out.token_ids.tolist()) == {0, 1}
    assert torch.isfinite(out.logprobs).all()


def test_top_n_sigma_off_and_greedy_rows_untouched():
    params = [SamplingParams(temperature=0.0, top_n_sigma=0.1), SamplingParams(temperature=1.0)]
    out = sample(LOGITS.repeat(2, 1), params, seeds=torch.tensor([1, 2]), steps=torch.zeros(2))
    assert int(out.token_ids[0]) == 0
    assert SamplingParams(top_n_sigma=0.0).top_n_sigma == 0.0
