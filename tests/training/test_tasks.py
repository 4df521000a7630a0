"""Synthetic tasks: split by construction, determinism, verifiers, preference pairs."""

from __future__ import annotations

import random

import pytest

from training.data.tasks import (
    DEFAULT_FAMILIES,
    FAMILIES,
    Problem,
    corrupt,
    few_shot_prompt,
    is_heldout,
    preference_pairs,
    pretraining_documents,
    sample_problems,
)


def test_train_and_heldout_are_disjoint_for_any_seed():
    heldout = sample_problems(40, "heldout", seed=1, unique=True)
    held_keys = {(p.family, p.key) for p in heldout.problems}
    assert all(p.heldout for p in heldout.problems)
    for seed in (0, 1, 2):
        train = sample_problems(300, "train", seed=seed)
        assert not held_keys & {(p.family, p.key) for p in train.problems}
        assert not any(p.heldout for p in train.problems)


def test_pretraining_text_never_contains_heldout_problems():
    heldout = sample_problems(40, "heldout", seed=3, unique=True).problems
    text = "\n".join(pretraining_documents(60, 8, seed=0))
    leaked = [p for p in heldout if f"Question: {p.prompt}\nAnswer: {p.answer}\n" in text]
    assert leaked == []


def test_split_is_a_function_of_the_problem_only():
    assert is_heldout("add", "12+34") == is_heldout("add", "12+34")
    share = sum(is_heldout("add", f"{a}+{b}") for a in range(60) for b in range(60)) / 3600
    assert 0.08 < share < 0.18


def test_generation_is_deterministic_by_seed():
    a, b = sample_problems(20, "train", seed=7), sample_problems(20, "train", seed=7)
    assert a.problems == b.problems and a.fingerprint == b.fingerprint
    assert sample_problems(20, "train", seed=8).fingerprint != a.fingerprint
    assert pretraining_documents(5, 4, seed=1) == pretraining_documents(5, 4, seed=1)


def test_every_family_present_and_interleaved():
    problems = sample_problems(3, "train", seed=0).problems
    assert [p.family for p in problems[:len(DEFAULT_FAMILIES)]] == list(DEFAULT_FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_canonical_answers_pass_and_corruptions_fail(family):
    rng = random.Random(0)
    for p in sample_problems(50, "train", seed=11, families=[family]).problems:
        assert p.check(p.answer)
        assert p.check(f" {p.answer}. ")          # forgiving of space and a full stop
        wrong = corrupt(p, rng)
        assert wrong != p.answer and not p.check(wrong), (p, wrong)


def test_answers_are_correct():
    p = Problem("add", "347+85", "What is 347 + 85?", "432")
    assert p.check("432") and not p.check("433") and not p.check("4320")
    s = Problem("sort", "5, 12, 3", "Sort in ascending order: 5, 12, 3", "3, 5, 12")
    assert s.check("3 5 12") and s.check("3, 5, 12.")
    assert not s.check("12, 5, 3") and not s.check("3, 5") and not s.check("3, 5, 12 and more")
    q = sample_problems(5, "train", seed=0, families=["sort"]).problems[0]
    assert q.answer == ", ".join(map(str, sorted(int(x) for x in q.key.split(", "))))
    for q in sample_problems(30, "train", seed=0, families=["palindrome", "count", "reverse"]).problems:
        if q.family == "palindrome":
            assert (q.answer == "yes") == (q.key == q.key[::-1])
        elif q.family == "count":
            letter, word = q.key.split(":")
            assert q.answer == str(word.count(letter))
        else:
            assert q.answer.replace(" ", "") == q.key[::-1]


def test_preference_pairs_prefer_correct_and_use_model_mistakes():
    problems = sample_problems(4, "train", seed=0).problems
    target = problems[0]
    pairs = preference_pairs(problems, seed=0, model_wrong={(target.family, target.key): ["999999", target.answer]})
    assert all(p.problem.check(p.chosen) and not p.problem.check(p.rejected) for p in pairs.pairs)
    assert pairs.pairs[0].rejected == "999999" and pairs.pairs[0].source == "model"
    assert {p.source for p in pairs.pairs[1:]} == {"corrupt"}
    assert preference_pairs(problems, seed=0).fingerprint == preference_pairs(problems, seed=0).fingerprint


def test_preference_pairs_take_several_distinct_model_mistakes_per_problem():
    problems = sample_problems(3, "train", seed=0).problems
    target = problems[0]
    mistakes = {(target.family, target.key): ["999999", "888888", "999999", target.answer]}
    one = preference_pairs(problems, seed=0, model_wrong=mistakes)
    two = preference_pairs(problems, seed=0, model_wrong=mistakes, model_pairs_per_problem=2)
    three = preference_pairs(problems, seed=0, model_wrong=mistakes, model_pairs_per_problem=3)
    assert len(one.pairs) == len(problems)
    model = [p for p in two.pairs if p.source == "model"]
    assert sorted(p.rejected for p in model) == ["888888", "999999"]
    assert all(p.problem is target and p.chosen == target.answer for p in model)
    assert len(two.pairs) == len(problems) + 1
    # Only two distinct mistakes exist: asking for three pairs gives the same two.
    assert [p.rejected for p in three.pairs] == [p.rejected for p in two.pairs]
    assert one.fingerprint != two.fingerprint


def test_few_shot_prompt_ends_where_the_answer_starts():
    shots = sample_problems(3, "train", seed=0, families=["add"]).problems
    target = sample_problems(1, "heldout", seed=0, families=["add"]).problems[0]
    text = few_shot_prompt(shots, target)
    assert text.endswith(f"Question: {target.prompt}\nAnswer:") and text.count("Question:") == 4


def test_json_answers_are_checked_as_json():
    p = Problem("json_add", "48+27", "What is 48 + 27? Reply in JSON.", '{"answer": 75}')
    assert p.check('{"answer":75}') and p.check(' {"answer": 75} ')
    for wrong in ('{"answer": 76}', '{"answer": "75"}', '{"answer": 75.0}', '{"answer": 75, "x": 1}', "75",
                  '{"answer": 75', "[75]"):
        assert not p.check(wrong), wrong
    assert "json_add" in FAMILIES and "json_add" not in DEFAULT_FAMILIES   # opt-in: presets name it
