"""Pipeline presets: RL prompt families are a subset of the preset's families, and the
RLHF stage draws its prompts from them alone."""

from __future__ import annotations

import dataclasses

import pytest

from training.pipeline import rlhf_prompts
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
