"""`sol report rl-compare`: PPO, GRPO and DPO from one SFT checkpoint on the demo's task.

The task is built-in problems of a few families, written as the own-data files: DPO
learns from preference pairs (the canonical answer over a corruption), PPO and GRPO from
prompts of the same problems with `training.rewards:builtin_tasks` (1 for a verified
answer) as the reward.
All three get the same sample budget: the RL runs sample `--rl-steps` worth of rollout
replies and DPO sees as many pairs. Each run is a real `sol train` process (DPO also
under `torchrun --nproc_per_node 2` with half the per-process batch: the same global
batch, so its loss curve should lie on the one-process curve). Every checkpoint is then
scored the same way on the held-out prompts: the mean reward of its greedy replies
(accuracy), its win rate against the SFT model's replies prompt by prompt (ties count
half), and beside it each run's wall time, peak RSS and the KL or held-out DPO loss its
stage reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt.checkpoint import load_checkpoint
from gpt.registry import Registry
from training.data.tasks import preference_pairs, sample_problems
from training.datasets.prompts import encode_prompts, read_prompts
from training.heldout import greedy_replies
from training.presets import pipeline_preset
from training.rewards import builtin_tasks, problem_row

REWARD = "python:training.rewards:builtin_tasks"
# Families the tiny demo SFT model already solves part of the time (greedy held-out
# accuracy 0.38 and 0.62 after `sol train sft --preset tiny`): RL needs some correct
# samples to learn from, and on add/sub/mul it samples none.
DEFAULT_FAMILIES = ("count", "palindrome")


@dataclass
class Run:
    label: str
    argv: list[str]
    procs: int = 1
    out: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0


def _pythonpath() -> str:
    """This checkout first, so that the runs train with the code that launched them."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def _launch(run: Run, common: list[str], log: Callable[[str], None]) -> None:
    """Runs one `sol train` (under torchrun for procs > 1) and keeps its --json output,
    wall time and peak RSS (the largest of the process and the children it waited for)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(run.procs)] \
        if run.procs > 1 else [sys.executable]
    cmd = [*launcher, "-m", "client.cli", "train", *run.argv, *common]
    log(f"{run.label}: {' '.join(cmd[1:])}")
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()})
        # wait4 rather than wait: its rusage holds the peak RSS of the process (and of the
        # workers torchrun waited for: the largest of them, not their sum).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        run.seconds = time.perf_counter() - began
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{run.label} failed (exit {proc.returncode}):\n{stderr.read()[-3000:]}")
        run.out = json.loads(stdout.read())
    run.peak_rss_mib = usage.ru_maxrss / 1024


def heldout_scores(ref: str, registry: Registry, prompts: Path, max_new_tokens: int) -> list[float]:
    """builtin_tasks' reward of the checkpoint's greedy reply to every held-out prompt."""
    ckpt = load_checkpoint(registry.resolve(ref).path)
    rows = read_prompts(prompts)
    data = encode_prompts(str(prompts), rows, ckpt.tokenizer, ckpt.model.config.max_seq_len, max_new_tokens, True)
    _, texts = greedy_replies(ckpt.model, ckpt.tokenizer, data.ids, max_new_tokens)
    return [builtin_tasks(p.messages, t, p.row.data) for p, t in zip(data.prompts, texts, strict=True)]


def win_rate(scores: list[float], baseline: list[float]) -> float:
    return sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline, strict=True)) / len(scores)


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted(run_dir.glob("*/metrics.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def write_task(directory: Path, families: tuple[str, ...], seed: int, eval_prompts: int,
               per_family: int = 200) -> Path:
    """The task's files: RL prompts and preference pairs (the canonical answer over a
    corruption) from the same training problems, and held-out prompts and pairs."""
    directory.mkdir(parents=True, exist_ok=True)
    train = sample_problems(per_family, "train", seed + 1, list(families)).problems
    held = sample_problems(max(1, eval_prompts // len(families)), "heldout", seed + 2, list(families),
                           unique=True).problems

    def pairs(problems: list, pair_seed: int) -> list[dict[str, Any]]:
        return [{"prompt": pair.problem.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
                for pair in preference_pairs(problems, pair_seed).pairs]

    for file, rows in (("prompts.jsonl", [problem_row(q) for q in train]),
                       ("prompts_eval.jsonl", [problem_row(q) for q in held]),
                       ("prefs.jsonl", pairs(train, seed)), ("prefs_eval.jsonl", pairs(held, seed + 3))):
        (directory / file).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return directory


def run_compare(parent: str, name: str, registry_root: Path, out: Path, preset_name: str = "tiny",
                seed: int = 0, rl_steps: int = 8, eval_prompts: int = 96, threads: int = 1,
                families: tuple[str, ...] = DEFAULT_FAMILIES, rl_lr: float = 1e-4, dpo_lr: float = 5e-4,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    from training.report import plot_rl_compare, rl_compare_markdown

    out.mkdir(parents=True, exist_ok=True)
    data = write_task(out / "data", families, seed, eval_prompts)
    held = data / "prompts_eval.jsonl"
    rl = pipeline_preset(preset_name).rlhf
    replies = rl.rollouts * rl_steps // rl.steps_per_rollout
    dpo_batch = 16
    dpo_steps = max(1, replies // dpo_batch)
    registry = Registry(registry_root)
    parent_ref = registry.resolve(parent).ref
    common = ["--preset", preset_name, "--name", name, "--from", parent_ref, "--registry", str(registry_root),
              "--seed", str(seed), "--quiet", "--json", "--threads", str(threads), "--fresh"]
    rl_args = ["--prompts", str(data / "prompts.jsonl"), "--eval-prompts", str(held), "--reward", REWARD,
               "--steps", str(rl_steps), "--log-every", "1", "--lr", str(rl_lr)]
    dpo_args = ["dpo", "--data", str(data / "prefs.jsonl"), "--eval-data", str(data / "prefs_eval.jsonl"),
                "--steps", str(dpo_steps), "--log-every", "1", "--lr", str(dpo_lr)]
    runs = [
        Run("PPO", ["rlhf", "--algo", "ppo", *rl_args]),
        Run("GRPO", ["rlhf", "--algo", "grpo", "--group", "4", *rl_args]),
        Run("DPO", [*dpo_args, "--batch-size", str(dpo_batch)]),
        Run("DPO, 2 processes", [*dpo_args, "--batch-size", str(dpo_batch // 2)], procs=2),
    ]
    for run in runs:
        _launch(run, [*common, "--run-dir", str(out / "runs" / run.label.replace(", ", "-").replace(" ", "_"))],
                log)
    baseline = heldout_scores(parent_ref, registry, held, rl.max_new_tokens)
    rows = [{"method": "SFT (start)", "procs": 1, "samples": 0, "reward": sum(baseline) / len(baseline),
             "win_rate": 0.5, "seconds": 0.0}]
    for run in runs:
        scores = heldout_scores(run.out["ref"], registry, held, rl.max_new_tokens)
        m = run.out["metrics"]
        rows.append({"method": run.label, "procs": run.procs, "ref": run.out["ref"],
                     "samples": replies if run.argv[0] == "rlhf" else dpo_steps * dpo_batch,
                     "reward": sum(scores) / len(scores), "win_rate": win_rate(scores, baseline),
                     "dpo_eval_loss": m.get("eval_loss_after"), "train_kl": m.get("final_kl"),
                     "tokens_per_s": m.get("tokens_per_s"), "seconds": run.seconds,
                     "peak_rss_mib": run.peak_rss_mib})
    curves = {run.label: read_curve(out / "runs" / run.label.replace(", ", "-").replace(" ", "_")) for run in runs}
    summary = {"parent": parent_ref, "preset": preset_name, "seed": seed, "heldout_prompts": len(baseline),
               "budget_replies": replies, "rows": rows, "runs": [asdict(r) | {"out": None} for r in runs]}
    png = plot_rl_compare(rows, curves, out / "rl_compare.png")
    md = out / "rl_compare.md"
    md.write_text(rl_compare_markdown(summary, png.name), encoding="utf-8")
    (out / "rl_compare.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    summary.update(markdown=str(md), png=str(png))
    return summary
