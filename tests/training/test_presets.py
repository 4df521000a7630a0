"""Pipeline presets: RL prompt families are a subset of the preset's families, the RLHF
stage draws its prompts from them alone, and every stage's problem sets can be drawn."""

from __future__ import annotations

import dataclasses

import pytest

from training.data.tasks import DEFAULT_FAMILIES
from training.pipeline import eval_problems, preference_problems, rlhf_prompts, sft_problems
from training.presets import PRESETS, pipeline_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_rl_families_are_among_the_trained_families(name):
    p = pipeline_preset(name)
    if p.families is not None:
        assert set(p.rl_families) <= set(p.families)


def test_rl_families_default_to_the_preset_families():
    p = dataclasses.replace(pipeline_preset("tiny"), families=("add", "sort"), rlhf_families=None)
    assert p.rl_families == ("add", "sort")
    assert {q.family for q in rlhf_prompts(p, seed=0).problems} == {"add", "sort"}


def test_rlhf_prompts_come_from_the_rl_families_only():
    p = dataclasses.replace(pipeline_preset("tiny"), families=("add", "sub", "palindrome"),
                            rlhf_families=("add", "sub"))
    prompts = rlhf_prompts(p, seed=0).problems
    assert {q.family for q in prompts} == {"add", "sub"}
    assert len(prompts) == 2 * p.rlhf_per_family


def test_rl_family_outside_the_preset_is_refused():
    with pytest.raises(ValueError, match="rlhf_families"):
        dataclasses.replace(pipeline_preset("cpu"), rlhf_families=("mul",))


DATA_FIELDS = ("families", "sft_per_family", "rm_per_family", "rm_eval_per_family", "rlhf_per_family",
               "rlhf_families", "rlhf_unseen_prompts", "rlhf_balanced_answers", "eval_per_family")


def test_every_stage_of_the_gpu_presets_can_draw_its_problems():
    # The GPU presets are not run here (tiny runs in the end-to-end test, cpu in the main
    # job): a family too small for one of their draws fails here, not hours into a GPU run.
    # gpu-medium draws what gpu-small does.
    p = pipeline_preset("gpu-small")
    medium = pipeline_preset("gpu-medium")
    assert all(getattr(p, f) == getattr(medium, f) for f in DATA_FIELDS)
    families = len(p.families or DEFAULT_FAMILIES)
    assert len(sft_problems(p, seed=0).problems) == p.sft_per_family * families
    train, heldout = preference_problems(p, seed=0)
    assert len(train) == p.rm_per_family * families and len(heldout) == p.rm_eval_per_family * families
    assert len(rlhf_prompts(p, seed=0).problems) == p.rlhf_per_family * len(p.rl_families or DEFAULT_FAMILIES)
    assert len(eval_problems(p)) == p.eval_per_family * families
