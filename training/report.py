"""The pipeline's report card: a markdown table and PNG plots (loss curves, reward and
KL curves, accuracy per stage), written beside the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")    # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ("base", "sft", "rlhf")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics file; a resumed run's repeated steps keep their latest record."""
    if not path.is_file():
        return []
    by_step: dict[Any, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record.get("step", record.get("iteration"))] = record
    return list(by_step.values())


def plot_losses(run_dir: Path, out: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (stage, title) in zip(axes, (("pretrain", "pretraining loss"), ("sft", "SFT loss (assistant tokens)"),
                                         ("reward", "reward model loss")), strict=True):
        records = read_jsonl(run_dir / stage / "metrics.jsonl")
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], color="tab:blue", label="loss")
        if stage == "reward" and records:
            twin = ax.twinx()
            twin.plot([r["step"] for r in records], [r.get("accuracy", 0) for r in records], color="tab:green",
                      alpha=0.7, label="train pair accuracy")
            twin.set_ylim(0, 1.05)
            twin.set_ylabel("pair accuracy", color="tab:green")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _save(fig, axes, out: Path) -> Path:
    """Grid on every panel, then write the figure and free it."""
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_rlhf(run_dir: Path, out: Path) -> Path:
    rollouts = read_jsonl(run_dir / "rlhf" / "rollouts.jsonl")
    steps = read_jsonl(run_dir / "rlhf" / "metrics.jsonl")
    it = [r["iteration"] for r in rollouts]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(it, [r["score"] for r in rollouts], color="tab:orange")
    axes[0].set_title("reward model score (raw)")
    axes[1].plot(it, [r["kl"] for r in rollouts], color="tab:red", label="KL to SFT (nats/reply)")
    twin = axes[1].twinx()
    twin.plot(it, [r["kl_coef"] for r in rollouts], color="tab:gray", linestyle="--", label="KL coefficient")
    twin.set_ylabel("KL coefficient", color="tab:gray")
    axes[1].set_title("KL to SFT and its coefficient")
    axes[2].plot(it, [r["sample_accuracy"] for r in rollouts], color="tab:green")
    axes[2].set_title("verified accuracy of rollouts (T=1)")
    axes[3].plot([r["step"] for r in steps], [r.get("entropy", 0) for r in steps], label="entropy")
    axes[3].plot([r["step"] for r in steps], [r.get("clip_fraction", 0) for r in steps], label="clip fraction")
    axes[3].plot([r["step"] for r in steps], [r.get("value_loss", 0) for r in steps], label="value loss")
    if any("ptx_loss" in r for r in steps):
        axes[3].plot([r["step"] for r in steps], [r.get("ptx_loss", 0) for r in steps], label="ptx (demos LM loss)")
    axes[3].legend(fontsize=8)
    axes[3].set_title("PPO")
    for ax in axes[:3]:
        ax.set_xlabel("rollout batch")
    axes[3].set_xlabel("step")
    return _save(fig, axes, out)


def plot_accuracy(summary: dict[str, Any], out: Path) -> Path:
    metrics = summary["metrics"]
    families = sorted(metrics["sft"]["tasks"]["per_family"])
    labels = [*families, "overall"]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(STAGES)
    for i, stage in enumerate(STAGES):
        tasks = metrics[stage]["tasks"]
        values = [tasks["per_family"].get(f, 0.0) for f in families] + [tasks["accuracy"]]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=f"{stage} ({tasks['accuracy']:.1%})")
    ax.set_xticks([x + width for x in range(len(labels))], labels)
    ax.set_ylim(0, 1.2)     # headroom for the legend above the bars
    ax.set_yticks([i / 5 for i in range(6)])
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"Held-out task accuracy per stage (seed {summary['seed']})")
    ax.legend(loc="upper center", ncol=len(STAGES))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_markdown(summary: dict[str, Any]) -> str:
    m = summary["metrics"]
    families = sorted(m["sft"]["tasks"]["per_family"])
    lines = [f"# sol pipeline report: {summary['name']} (preset {summary['preset']}, seed {summary['seed']})", "",
             f"Model: {summary['num_parameters'] / 1e6:.2f}M parameters, {summary['model']['n_layers']} layers, "
             f"d_model {summary['model']['d_model']}, vocabulary {summary['model']['vocab_size']}; "
             f"device {summary['device']}, {summary['torch_threads']} threads, world size {summary['world_size']}.", "",
             "## Held-out task accuracy (greedy; base few-shot, chat models through the chat template)", "",
             "| stage | checkpoint | overall | " + " | ".join(families) + " |",
             "|---|---|---|" + "---|" * len(families)]
    for stage in STAGES:
        tasks = m[stage]["tasks"]
        lines.append(f"| {stage} | `{summary['refs'].get(stage)}` | **{_pct(tasks['accuracy'])}** | " +
                     " | ".join(_pct(tasks["per_family"].get(f)) for f in families) + " |")
    rm = m["rm"]["pairwise"]
    gain = m["rlhf"]["tasks"]["accuracy"] - m["sft"]["tasks"]["accuracy"]
    lines += ["", f"RLHF minus SFT: **{100 * gain:+.1f} points** on {m['sft']['tasks']['n']} held-out problems.", "",
              "## Other measurements", "",
              "| measurement | value |", "|---|---|",
              f"| base perplexity on held-out corpus text | {m['base']['perplexity']:.2f} |",
              f"| reward model held-out pairwise accuracy | {rm['accuracy']:.3f} (n={int(rm['n'])}) |"]
    for key in sorted(k for k in rm if k.startswith("accuracy_")):
        lines.append(f"| ... rejected reply from `{key.removeprefix('accuracy_')}` | {rm[key]:.3f} |")
    if m["rlhf"].get("prompt_families"):
        lines.append(f"| RLHF prompt families | {', '.join(m['rlhf']['prompt_families'])} |")
    if m["rlhf"].get("ptx_coef"):
        lines.append(f"| PPO-ptx coefficient (demonstrations' LM loss in each PPO minibatch) | {m['rlhf']['ptx_coef']} |")
    lines += [f"| final KL to SFT (nats per reply, rollout estimate) | {m['rlhf']['final_kl']:.3f} |",
              f"| final KL coefficient | {m['rlhf']['kl_coef']:.4f} |"]
    for stage, seconds in summary["seconds"].items():
        lines.append(f"| time: {stage} | {seconds:.0f} s |")
    ranking = m["rm"].get("ranking")
    if ranking:
        lines += ["", "## How the reward model ranks the SFT policy's own samples (the same held-out problems)", "",
                  "Best-of-n at or below the SFT model's greedy accuracy means RL against this reward "
                  "cannot lift that family; only mixed problems (some samples right, some wrong) carry a "
                  "learning signal.", "",
                  "| family | SFT greedy | SFT sample at temperature 1 | mixed problems | right-over-wrong pairs | best-of-n |",
                  "|---|---|---|---|---|---|"]
        for family, r in ranking.items():
            pairs = "n/a" if r["pair_accuracy"] is None else f"{r['pair_accuracy']:.3f}"
            lines.append(f"| {family} | {_pct(m['sft']['tasks']['per_family'].get(family))} | "
                         f"{_pct(r['sample_accuracy'])} | {_pct(r['mixed'])} | {pairs} | {_pct(r['best_of_n'])} |")
    lines += ["", "## Plots", "", "![accuracy](accuracy.png)", "", "![losses](losses.png)", "",
              "![rlhf](rlhf.png)", "", "## Sample replies (held-out)", "",
              "| stage | prompt | reply | answer | ok |", "|---|---|---|---|---|"]
    for stage in STAGES:
        for s in m[stage]["tasks"].get("samples", [])[::3]:
            reply = str(s["reply"]).replace("|", "\\|").replace("\n", " ")[:40]
            lines.append(f"| {stage} | {s['prompt']} | {reply} | {s['answer']} | {'yes' if s['correct'] else 'no'} |")
    lines += ["", "## Checkpoints", ""]
    for stage, path in summary["checkpoints"].items():
        lines.append(f"- {stage}: `{summary['refs'].get(stage)}` at `{path}`")
    lines.append(f"- run directory (metrics JSONL, resumable state): `{summary['run_dir']}`")
    return "\n".join(lines) + "\n"


def write_report(summary: dict[str, Any], run_dir: Path, report_dir: Path) -> Path:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_losses(Path(run_dir), report_dir / "losses.png")
    plot_rlhf(Path(run_dir), report_dir / "rlhf.png")
    plot_accuracy(summary, report_dir / "accuracy.png")
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    path = report_dir / "report.md"
    path.write_text(render_markdown(summary), encoding="utf-8")
    return path


# --- sol report rl-compare ---------------------------------------------------------------------

def plot_rl_compare(rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    """DPO's training loss with one process and with two (the same global batch), the RL
    runs' rollout reward per step, and every checkpoint's held-out reward."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for label, style in (("DPO", dict(color="tab:blue", marker="o", label="1 process, batch 16")),
                         ("DPO, 2 processes", dict(color="tab:orange", linestyle="--", marker="x",
                                                   label="torchrun 2 processes, batch 8 each"))):
        records = curves.get(label, [])
        axes[0].plot([r["step"] for r in records], [r["loss"] for r in records], **style)
    axes[0].set_title("DPO training loss")
    axes[0].legend(fontsize=8)
    for label, color in (("PPO", "tab:red"), ("GRPO", "tab:green")):
        records = [r for r in curves.get(label, []) if "score" in r]
        axes[1].plot([r["step"] for r in records], [r["score"] for r in records], color=color, marker=".",
                     label=label)
    axes[1].set_title("mean reward of the rollout replies (T=1)")
    axes[1].legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_xlabel("optimizer step")
    names = [r["method"] for r in rows]
    bars = axes[2].bar(range(len(rows)), [r["reward"] for r in rows],
                       color=["tab:gray", "tab:red", "tab:green", "tab:blue", "tab:orange"][:len(rows)])
    axes[2].bar_label(bars, fmt="%.3f", fontsize=8)
    axes[2].set_xticks(range(len(rows)), [n.replace(", ", "\n") for n in names], fontsize=8)
    axes[2].set_title("held-out accuracy (greedy)")
    axes[2].set_ylim(0, min(1.0, max(r["reward"] for r in rows) * 1.25 + 0.02))
    return _save(fig, axes, out)


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def rl_compare_markdown(summary: dict[str, Any], png: str) -> str:
    lines = [
        "# PPO vs GRPO vs DPO on the demo task", "",
        f"From `{summary['parent']}` (preset `{summary['preset']}`, seed {summary['seed']}); sample budget "
        f"{summary['budget_replies']} replies (RL) or pairs (DPO); held-out: {summary['heldout_prompts']} prompts, "
        "greedy replies checked by `training.rewards:builtin_tasks`. Win rate: against the SFT model's reply to the "
        "same prompt (ties count half).", "",
        "| method | processes | samples | held-out accuracy | win rate vs SFT | held-out DPO loss | KL to SFT "
        "(last rollout, nats/reply) | tokens/s | wall s | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        lines.append(f"| {r['method']} | {r['procs']} | {r['samples']} | {r['reward']:.3f} | {r['win_rate']:.3f} | "
                     f"{_num(r.get('dpo_eval_loss'), '{:.4f}')} | {_num(r.get('train_kl'))} | "
                     f"{_num(r.get('tokens_per_s'), '{:.0f}')} | {r['seconds']:.1f} | "
                     f"{_num(r.get('peak_rss_mib') or None, '{:.0f}')} |")
    lines += ["", f"![losses, rewards and held-out accuracy]({png})", ""]
    return "\n".join(lines)
