"""Training decodes through the serving engine: on the policy's live weights (an update
in place is seen by the next rollout once the prefix cache is reset), with one engine and
one KV pool for the whole RLHF stage, and with chosen-token log-probs that agree with the
ones PPO recomputes in the training forward."""

from __future__ import annotations

import copy

import torch

from gpt.chat import chat_stop_ids
from server.engine.api import SamplingParams
from server.engine.offline import generate
from tests.conftest import make_tiny_model
from tests.engine.conftest import lively, reference_greedy
from training.batching import pad_right
from training.data.tasks import sample_problems
from training.decoding import training_engine
from training.heads import PolicyWithValue, RewardModel
from training.loop import LoopConfig
from training.stages.rlhf import RLHFConfig, RLHFStage, reply_logprobs


def _nudge(model: torch.nn.Module, seed: int) -> None:
    """A training step's worth of change, made in place as the optimizer makes it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _stage(tokenizer, policy: PolicyWithValue) -> RLHFStage:
    problems = sample_problems(4, "train", seed=0, families=["add", "sort"]).problems
    cfg = RLHFConfig(LoopConfig(batch_size=4, seed=3), rollouts=8, samples_per_prompt=2, max_new_tokens=6)
    return RLHFStage(policy, make_tiny_model(tokenizer, seed=5), RewardModel(make_tiny_model(tokenizer, seed=6)),
                     tokenizer, problems, cfg)


def test_an_update_in_place_reaches_the_next_generation_after_a_prefix_cache_reset(tiny_tokenizer):
    model = lively(make_tiny_model(tiny_tokenizer, seed=2))
    # Prompts of several full blocks, so that the first call leaves them in the prefix cache.
    prompts = [tiny_tokenizer.encode(t) for t in (
        "In the beginning there was nothing but a long and winding road that led to the sea",
        "The cat sat on the mat and looked at the bird outside the window for a long time")]
    assert min(len(p) for p in prompts) > 2 * 16
    engine = training_engine(model, max_len=64)
    assert engine.model is model                      # the live module, not a copy
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    before = [o.token_ids for o in generate(engine, prompts, greedy)]
    assert before == [reference_greedy(model, p, 8) for p in prompts]
    hits = engine.stats().prefix_cache_hits

    _nudge(model, seed=0)
    engine.reset_prefix_cache()
    after = [o.token_ids for o in generate(engine, prompts, greedy)]
    assert engine.stats().prefix_cache_hits == hits   # no block of the old weights was reused
    assert after == [reference_greedy(model, p, 8) for p in prompts]
    assert after != before
    engine.blocks.check_whole()


def test_rollouts_share_one_engine_on_the_live_policy(tiny_tokenizer):
    policy = PolicyWithValue(lively(make_tiny_model(tiny_tokenizer, seed=5)))
    stage = _stage(tiny_tokenizer, policy)
    stage.make_rollout(0, 0, 1)
    engine = stage.engine
    assert engine is not None and engine.model is policy.gpt and engine.thread is None
    pool = engine.cache.pool.data_ptr()

    _nudge(policy.gpt, seed=1)
    second = stage.make_rollout(1, 0, 1)
    assert stage.engine is engine and engine.cache.pool.data_ptr() == pool
    engine.blocks.check_whole()
    # What the updated weights sample: a fresh stage on a copy of them, with the same
    # seeds, draws the same rollout.
    fresh = _stage(tiny_tokenizer, copy.deepcopy(policy))
    again = fresh.make_rollout(1, 0, 1)
    assert torch.equal(second.seqs, again.seqs)
    assert torch.allclose(second.logp, again.logp)


def test_engine_logprobs_agree_with_the_training_forward(tiny_tokenizer):
    policy = PolicyWithValue(lively(make_tiny_model(tiny_tokenizer, seed=7)))
    engine = training_engine(policy.gpt, max_len=48)
    temperature = 0.7
    prompts = [tiny_tokenizer.encode(t) for t in ("Hello there", "a", "What is 12 plus 30? The answer is",
                                                  "Once upon a time in a land far away")]
    params = [SamplingParams(temperature=temperature, top_k=0, top_p=1.0, max_tokens=10, seed=s, logprobs=1)
              for s in range(len(prompts))]
    choices = [o.choices[0] for o in generate(engine, prompts, params, chat_stop_ids(tiny_tokenizer))]
    replies = [c.token_ids for c in choices]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in choices)

    # As RLHFStage.make_rollout recomputes them: right-padded prompt + reply, one forward.
    seqs = pad_right([p + r for p, r in zip(prompts, replies, strict=True)], tiny_tokenizer.eot_id)
    index = pad_right([list(range(len(p) - 1, len(p) - 1 + len(r))) for p, r in zip(prompts, replies,
                                                                                     strict=True)], 0)
    targets = pad_right(replies, tiny_tokenizer.eot_id)
    with torch.no_grad():
        logits, _ = policy(seqs)
        recomputed, _ = reply_logprobs(logits, index, targets, temperature)
    for row, choice in enumerate(choices):
        engine_lp = torch.tensor(choice.logprobs)
        assert torch.allclose(engine_lp, recomputed[row, :len(choice.logprobs)], atol=1e-4), row
    # The engine's are of the distribution sampled from (after temperature), not of the raw one.
    raw, _ = reply_logprobs(logits, index, targets, 1.0)
    assert not torch.allclose(torch.tensor(choices[0].logprobs), raw[0, :len(choices[0].logprobs)], atol=1e-3)
