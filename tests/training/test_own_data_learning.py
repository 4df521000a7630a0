"""Each stage on files, from the demo-style tiny model (the `tiny` preset's pretraining
and SFT on the built-in tasks): the held-out measure it reports moves the right way.

The tiny model's matmuls gain nothing from a second thread, and on a shared machine a
second OpenMP thread made a training step 8x slower (2.4 s against 0.29 s, load 8 on 2
cores), so these tests train on one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.registry import Registry
from tests.training.own_data_helpers import build_demo_registry, run_cli, write_jsonl
from training.data.tasks import sample_problems

REWARDS = "python:tests.training.own_data_rewards"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    registry = build_demo_registry(root, tiny_tokenizer)
    # Fixed versions: the tests publish new sft / rm / dpo / rlhf aliases as they go.
    refs = {alias: registry.resolve(f"demo:{alias}").ref for alias in ("base", "sft")}
    yield registry, refs
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory, demo):
    out = tmp_path_factory.mktemp("files")
    mp = pytest.MonkeyPatch()
    try:
        assert run_cli(["data", "export-demo", str(out), "--preset", "tiny", "--json"], mp) == 0
    finally:
        mp.undo()
    return out


def _train(argv: list[str], registry: Registry, tmp_path, monkeypatch, capsys) -> dict:
    assert run_cli(["train", *argv, "--preset", "tiny", "--name", "demo", "--registry", str(registry.root),
                    "--run-dir", str(tmp_path / "runs"), "--quiet", "--json"], monkeypatch) == 0
    out = json.loads(capsys.readouterr().out)
    meta = load_checkpoint(registry.resolve(out["ref"]).path).meta
    assert meta["metrics"]["data"]["data"] != "<built-in tasks>"
    return out


def style_pairs(n_per_family: int, split: str) -> list[dict]:
    """A preference the tiny model can learn and does not already hold: answers that end
    with " (checked)" over the same answers without it (which the SFT model, trained on
    the bare answers, finds far more likely)."""
    problems = sample_problems(n_per_family, split, seed=5, families=["add", "sub", "compare", "sort"]).problems
    return [{"prompt": q.prompt, "chosen": f"{q.answer} (checked)", "rejected": q.answer} for q in problems]


def test_sft_from_a_file_lowers_heldout_loss(demo, demo_files, tmp_path, monkeypatch, capsys):
    registry, refs = demo
    out = _train(["sft", "--from", refs["base"], "--data", str(demo_files / "sft.jsonl"), "--eval-data",
                  str(demo_files / "sft_eval.jsonl"), "--steps", "20"], registry, tmp_path, monkeypatch, capsys)
    assert out["stage"] == "sft" and out["ref"].startswith("demo@")
    assert out["eval_loss_after"] < out["eval_loss_before"] - 0.1, out
    assert out["metrics"]["data"]["heldout"]["rows"] == 128


def test_dpo_raises_heldout_preference_accuracy(demo, tmp_path, monkeypatch, capsys):
    registry, refs = demo
    data = write_jsonl(tmp_path / "prefs.jsonl", style_pairs(40, "train"))
    out = _train(["dpo", "--from", refs["sft"], "--data", str(data), "--steps", "30", "--beta", "0.1"],
                 registry, tmp_path, monkeypatch, capsys)
    # Before training the policy is its reference: every margin is 0 (accuracy 0.5, loss log 2).
    assert out["eval_accuracy_before"] == 0.5 and math.isclose(out["eval_loss_before"], math.log(2), rel_tol=1e-4)
    assert out["eval_accuracy_after"] >= 0.8, out
    assert out["eval_loss_after"] < out["eval_loss_before"]
    m = out["metrics"]
    assert m["data"]["heldout"]["rows"] == 16 and m["data"]["train"]["rows"] == 144    # a tenth held out
    # The policy itself still finds the bare answers likelier (the chosen ones are longer):
    # DPO moved it relative to its reference, which is what the implicit reward measures.
    assert m["eval_likelihood_accuracy_before"] < 0.5
    assert load_checkpoint(registry.resolve(out["ref"]).path).meta["reference"] == refs["sft"]


def test_reward_model_from_pairs_ranks_heldout_pairs_above_chance(demo, demo_files, tmp_path, monkeypatch,
                                                                  capsys):
    registry, refs = demo
    data = write_jsonl(tmp_path / "prefs.jsonl", style_pairs(40, "train"))
    held = write_jsonl(tmp_path / "prefs_eval.jsonl", style_pairs(10, "heldout"))
    out = _train(["reward", "--from", refs["sft"], "--data", str(data), "--eval-data", str(held), "--steps", "40",
                  "--lr", "3e-3"], registry, tmp_path, monkeypatch, capsys)
    # Untrained, the score is the backbone's likelihood, which prefers the bare answers.
    assert out["eval_accuracy_before"] < 0.5 < 0.75 <= out["eval_accuracy_after"], out
    assert out["eval_loss_after"] < out["eval_loss_before"]

    # That reward model drives PPO on a prompt file (rm:REF).
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [json.loads(line) for line in
                                                       (demo_files / "prompts.jsonl").read_text().splitlines()[:64]])
    rl = _train(["rlhf", "--from", refs["sft"], "--prompts", str(prompts), "--reward", f"rm:{out['ref']}",
                 "--steps", "2"], registry, tmp_path, monkeypatch, capsys)
    assert rl["metrics"]["algo"] == "ppo" and math.isfinite(rl["eval_reward_after"])
    assert load_checkpoint(registry.resolve(rl["ref"]).path).meta["reward_model"] == out["ref"]


def test_grpo_with_a_python_reward_raises_heldout_mean_reward(demo, demo_files, tmp_path, monkeypatch, capsys):
    registry, refs = demo
    lines = (demo_files / "prompts.jsonl").read_text().splitlines()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [json.loads(x) for x in lines[:200]])
    held = write_jsonl(tmp_path / "prompts_eval.jsonl",
                       [json.loads(x) for x in (demo_files / "prompts_eval.jsonl").read_text().splitlines()[:48]])
    out = _train(["rlhf", "--from", refs["sft"], "--prompts", str(prompts), "--eval-prompts", str(held),
                  "--reward", f"{REWARDS}:has_digit_seven", "--algo", "grpo", "--group", "4", "--steps", "16",
                  "--lr", "1e-3"], registry, tmp_path, monkeypatch, capsys)
    # The reward (a 7 anywhere in the reply) is easy to learn whatever the prompt; the SFT
    # model's greedy answers seldom hold one.
    assert out["eval_reward_after"] > out["eval_reward_before"] + 0.2, out
    m = out["metrics"]
    assert m["algo"] == "grpo" and m["samples_per_prompt"] == 4 and m["reward_calls"] >= 8 * 32
    # GRPO has no value head to publish.
    assert not load_checkpoint(registry.resolve(out["ref"]).path).heads


def test_continued_pretraining_on_a_text_file_lowers_heldout_loss(demo, demo_files, tmp_path, monkeypatch,
                                                                 capsys):
    registry, refs = demo
    out = _train(["pretrain", "--from", refs["base"], "--data", str(demo_files / "corpus.txt"), "--steps", "10"],
                 registry, tmp_path, monkeypatch, capsys)
    assert out["eval_loss_after"] < out["eval_loss_before"], out


def test_without_files_dpo_and_grpo_train_on_the_builtin_tasks(demo, tmp_path, monkeypatch, capsys):
    registry, refs = demo
    argv = ["--preset", "tiny", "--name", "demo", "--registry", str(registry.root), "--run-dir", str(tmp_path),
            "--quiet", "--json", "--steps", "2"]
    assert run_cli(["train", "dpo", "--from", refs["sft"], *argv], monkeypatch) == 0
    dpo = json.loads(capsys.readouterr().out)
    assert dpo["metrics"]["data"]["data"] == "<built-in tasks>" and dpo["metrics"]["data"]["heldout"]["rows"] == 64
    assert run_cli(["train", "rlhf", "--from", refs["sft"], "--algo", "grpo", "--reward",
                    "python:training.rewards:builtin_tasks", *argv], monkeypatch) == 0
    rl = json.loads(capsys.readouterr().out)
    # Held out: the pipeline's own evaluation problems; the reward is their verifier.
    assert rl["metrics"]["data"]["heldout"]["rows"] == 128 and 0.0 <= rl["eval_reward_after"] <= 1.0
