"""Where RLHF's signal comes from: prompts that are not SFT demonstrations, and rollout
batches that keep the prompts whose sampled replies differ."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import make_tiny_model
from training.data.tasks import sample_problems
from training.heads import PolicyWithValue, RewardModel
from training.loop import LoopConfig
from training.pipeline import rlhf_prompts, sft_problems
from training.presets import pipeline_preset
from training.stages.rlhf import RLHFConfig, RLHFStage, varied_groups_first


def test_varied_groups_come_first_in_drawing_order():
    # Four prompts, two replies each: groups 1 and 3 differ, groups 0 and 2 agree.
    replies = [[1], [1], [1], [2], [3], [3], [4], [5, 6]]
    keep, varied = varied_groups_first(replies, group=2, keep=3)
    assert varied == [False, True, False, True]
    assert keep == [2, 3, 6, 7, 0, 1]


def test_without_varied_groups_the_first_drawn_are_kept():
    keep, varied = varied_groups_first([[7]] * 6, group=2, keep=2)
    assert varied == [False, False, False] and keep == [0, 1, 2, 3]


def _stage(tokenizer, **overrides) -> RLHFStage:
    problems = sample_problems(6, "train", seed=0, families=["add", "sort"]).problems
    cfg = RLHFConfig(LoopConfig(batch_size=4, seed=3), **{"rollouts": 8, "samples_per_prompt": 2,
                                                           "max_new_tokens": 4, **overrides})
    return RLHFStage(PolicyWithValue(make_tiny_model(tokenizer, seed=5)), make_tiny_model(tokenizer, seed=5),
                     RewardModel(make_tiny_model(tokenizer, seed=6)), tokenizer, problems, cfg)


def test_oversampled_rollout_keeps_a_full_batch(tiny_tokenizer):
    rollout = _stage(tiny_tokenizer, prompt_oversample=3).make_rollout(0, 0, 1)
    assert rollout.seqs.shape[0] == 8
    assert rollout.stats["varied_groups_kept"] >= rollout.stats["varied_groups_drawn"]


def test_oversampling_needs_several_replies_per_prompt(tiny_tokenizer):
    with pytest.raises(ValueError, match="prompt_oversample"):
        _stage(tiny_tokenizer, prompt_oversample=2, samples_per_prompt=1)


def test_unseen_rl_prompts_are_no_sft_demonstrations():
    p = dataclasses.replace(pipeline_preset("tiny"), families=("add", "sort"), rlhf_unseen_prompts=True)
    demos = {(q.family, q.key) for q in sft_problems(p, seed=0).problems}
    prompts = rlhf_prompts(p, seed=0).problems
    assert len(prompts) == 2 * p.rlhf_per_family
    assert not {(q.family, q.key) for q in prompts} & demos
    # Without the option the same draw does reach SFT problems (small families repeat).
    seen = rlhf_prompts(dataclasses.replace(p, rlhf_unseen_prompts=False), seed=0).problems
    assert {(q.family, q.key) for q in seen} & demos


def test_sample_problems_skips_excluded_keys():
    first = sample_problems(5, "train", seed=2, families=["add"]).problems
    exclude = {("add", first[0].key)}
    again = sample_problems(5, "train", seed=2, families=["add"], exclude=exclude).problems
    assert first[0].key not in {q.key for q in again}
    assert [q.key for q in again[:4]] == [q.key for q in first[1:5] if q.key != first[0].key][:4]


def test_balanced_rl_prompts_give_yes_no_families_both_answers_equally():
    p = dataclasses.replace(pipeline_preset("tiny"), families=("add", "palindrome"), rlhf_unseen_prompts=True,
                            rlhf_balanced_answers=True)
    demos = {(q.family, q.key) for q in sft_problems(p, seed=0).problems}
    prompts = rlhf_prompts(p, seed=0).problems
    palindromes = [q for q in prompts if q.family == "palindrome"]
    answers = [q.answer for q in palindromes]
    assert len(palindromes) == p.rlhf_per_family
    assert answers.count("yes") == answers.count("no") == p.rlhf_per_family // 2
    assert not {(q.family, q.key) for q in prompts} & demos
    # Other families draw exactly as without the option.
    unbalanced = rlhf_prompts(dataclasses.replace(p, rlhf_balanced_answers=False), seed=0).problems
    assert [q for q in prompts if q.family == "add"] == [q for q in unbalanced if q.family == "add"]
    # Unbalanced, the unseen palindromes are mostly "no": SFT has drawn most "yes" ones.
    skewed = [q.answer for q in unbalanced if q.family == "palindrome"]
    assert skewed.count("yes") < skewed.count("no")
