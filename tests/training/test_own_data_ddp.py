"""The own-data stages under DDP and after a crash, through `sol train` on real files.

For SFT and the reward model from files, DPO and GRPO: two gloo processes under torchrun
(batch B each) end with the weights and loss curve of one process with batch 2B, and a
two-process run SIGKILLed right after a checkpoint, run again with the same command,
ends with exactly the weights of the uninterrupted two-process run. Tolerances: weights
within ATOL (float32 sums taken in another order: per-rank batches are padded to their
own width and DDP averages two partial gradients) and logged losses within LOSS_TOL.

One thread per process (2 cores shared): a second OpenMP thread buys nothing on the
tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.registry import Registry
from tests.training.own_data_helpers import ROOT, publish_tiny, write_jsonl
from training.data.tasks import sample_problems

ATOL = 1e-4
LOSS_TOL = 1e-4
REWARDS = "python:tests.training.own_data_rewards"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    registry = Registry(root / "registry")
    publish_tiny(registry, tiny_tokenizer, max_seq_len=128)
    problems = sample_problems(12, "train", seed=3, families=["add", "sub", "compare", "reverse"]).problems
    sft = write_jsonl(root / "sft.jsonl", [{"messages": q.conversation()} for q in problems])
    prefs = write_jsonl(root / "prefs.jsonl", [{"prompt": q.prompt, "chosen": f"{q.answer} (checked)",
                                                "rejected": q.answer} for q in problems])
    prompts = write_jsonl(root / "prompts.jsonl", [{"messages": [{"role": "user", "content": q.prompt}]}
                                                   for q in problems])
    return {"root": root, "registry": registry, "sft": sft, "prefs": prefs, "prompts": prompts}


def sol(files: dict, label: str, argv: list[str], overrides: dict, procs: int = 1, kill_at: int = 0,
        run_dir: str | None = None) -> dict | None:
    """Runs `sol train ARGV` (under torchrun when procs > 1); its --json output, or None
    when it was killed."""
    root = files["root"]
    out = root / f"{label}.json"
    module = ["-m", "tests.training.ddp_cli", str(out), json.dumps(overrides), "--"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] \
        if procs > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SOL_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "SOL_TEST_KILL_AT": str(kill_at)}
    cmd = [*launcher, *module, "train", *argv, "--preset", "tiny", "--name", "own", "--from", "own:base",
           "--registry", str(files["registry"].root), "--run-dir", str(root / "runs" / (run_dir or label)),
           "--quiet", "--json", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if kill_at:
        assert proc.returncode != 0, "the run was to be killed at its checkpoint"
        return None
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def weights(files: dict, out: dict) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(files["registry"].resolve(out["ref"]).path)
    return {**ckpt.model.state_dict(), **ckpt.heads}


def losses(files: dict, label: str) -> list[float]:
    (metrics,) = (files["root"] / "runs" / label).glob("*/metrics.jsonl")
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], common: bool = False) -> float:
    """Largest elementwise difference (over the keys both hold when `common`: the base
    checkpoint has no heads)."""
    assert common or a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if k in b)


def check_stage(files: dict, name: str, argv: list[str], batch: dict, steps: int, kill_at: int) -> dict:
    """One process with the doubled batch, two processes, and two processes killed at
    `kill_at` then resumed: returns the measured differences."""
    key, double = next(iter(batch.items()))
    half = {key: {k: v // 2 if k in ("batch_size", "rollouts") else v for k, v in double.items()}}
    argv = [*argv, "--steps", str(steps)]
    one = sol(files, f"{name}-one", argv, batch)
    two = sol(files, f"{name}-two", argv, half, procs=2)
    assert sol(files, f"{name}-killed", [*argv, "--save-every", str(kill_at)], half, procs=2, kill_at=kill_at,
               run_dir=f"{name}-resumed") is None
    (state,) = (files["root"] / "runs" / f"{name}-resumed").glob("*/state/trainer.json")
    assert json.loads(state.read_text())["step"] == kill_at
    resumed = sol(files, f"{name}-resumed", [*argv, "--save-every", str(kill_at)], half, procs=2)

    w_one, w_two, w_resumed = weights(files, one), weights(files, two), weights(files, resumed)
    l_one, l_two = losses(files, f"{name}-one"), losses(files, f"{name}-two")
    assert len(l_one) == len(l_two) == steps
    measured = {"weights_1v2": max_diff(w_one, w_two),
                "loss_1v2": max(abs(a - b) for a, b in zip(l_one, l_two, strict=True)),
                "weights_resumed": max_diff(w_two, w_resumed),
                "moved": max_diff(w_one, weights_of_base(files), common=True)}
    print(name, measured)
    assert measured["moved"] > 10 * ATOL, "the stage must have trained for the comparison to mean anything"
    assert measured["weights_1v2"] < ATOL and measured["loss_1v2"] < LOSS_TOL, measured
    assert measured["weights_resumed"] == 0.0, measured
    for key in ("eval_loss_before", "eval_loss_after") if name != "grpo" else ("eval_reward_before",):
        assert abs(one[key] - two[key]) < LOSS_TOL and resumed[key] == two[key], (key, one, two, resumed)
    return measured


def weights_of_base(files: dict) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(files["registry"].resolve("own:base").path)
    return {**ckpt.model.state_dict(), **ckpt.heads}


def test_sft_from_a_file(files):
    check_stage(files, "sft", ["sft", "--data", str(files["sft"])], {"sft": {"batch_size": 8, "log_every": 1,
                                                                                  "lr": 3e-3}}, 6, 3)


def test_reward_model_from_pairs(files):
    check_stage(files, "reward", ["reward", "--data", str(files["prefs"])],
                {"reward": {"batch_size": 8, "log_every": 1, "lr": 3e-3}}, 6, 3)


def test_dpo(files):
    check_stage(files, "dpo", ["dpo", "--data", str(files["prefs"])],
                {"dpo": {"batch_size": 8, "log_every": 1, "lr": 3e-3}}, 6, 3)


def test_grpo_with_a_python_reward(files):
    # 16 replies per rollout in groups of 4, minibatches of 8: a rollout serves 2 steps, so
    # the kill at step 1 falls inside one and the resumed run must reuse its saved replies.
    check_stage(files, "grpo", ["rlhf", "--prompts", str(files["prompts"]), "--reward", f"{REWARDS}:short_reply",
                                "--algo", "grpo", "--group", "4"],
                {"rlhf": {"batch_size": 8, "rollouts": 16, "log_every": 1, "lr": 1e-3, "max_new_tokens": 8}}, 4, 1)
