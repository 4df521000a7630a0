"""CLI: `sol train {tokenizer,pretrain,sft,reward,dpo,rlhf}`, `sol pipeline`.

`--data FILE` (and `--prompts FILE` for rlhf) trains on a user's own JSON Lines file
instead of the built-in tasks (training/own_data.py; formats in training/datasets/).

Every command works alone or under torchrun, e.g.
`torchrun --nproc_per_node 2 .venv/bin/sol train pretrain --name demo` (rank 0 logs and
publishes). Stage runs keep their resumable state under `$SOL_HOME/runs/<name>/<stage>/`,
so running the same command again after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from client.output import add_json_flag, emit, table

STAGES = ("tokenizer", "pretrain", "sft", "reward", "dpo", "rlhf")
STAGE_CONFIG = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "rlhf": "rlhf"}


def register(subparsers, bench_subparsers) -> None:
    from training import lora_training
    from training.presets import DEFAULT_PRESET, PRESETS

    def common(p: argparse.ArgumentParser, with_name: bool = True) -> None:
        p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                       help=f"pipeline preset (default {DEFAULT_PRESET}; gpu-* are unverified here)")
        if with_name:
            p.add_argument("--name", default="demo", help="model name in the registry (default demo)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--registry", type=Path, default=None, help="registry root (default $SOL_HOME/registry)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    pipe = subparsers.add_parser(
        "pipeline", help="tokenizer -> pretrain -> SFT -> reward model -> RLHF -> evaluation -> report")
    common(pipe)
    add_json_flag(pipe)
    pipe.set_defaults(handler=_pipeline)

    report = subparsers.add_parser("report", help="training reports")
    report_sub = report.add_subparsers(dest="report", metavar="REPORT", required=True)
    compare = report_sub.add_parser(
        "rl-compare", help="PPO vs GRPO vs DPO from one SFT checkpoint on the demo task: a markdown table and a PNG")
    common(compare)
    compare.add_argument("--from", dest="parent", default="NAME:sft", help="SFT checkpoint (default NAME:sft)")
    compare.add_argument("--out", type=Path, required=True, help="directory for the data, runs and report")
    compare.add_argument("--rl-steps", type=int, default=8,
                         help="RL optimizer steps; DPO sees as many pairs as the RL runs sample replies (default 8)")
    compare.add_argument("--eval-prompts", type=int, default=96, help="held-out prompts scored (default 96)")
    compare.add_argument("--families", default="count,palindrome",
                         help="task families, comma-separated (default count,palindrome)")
    compare.add_argument("--rl-lr", type=float, default=1e-4, help="PPO and GRPO learning rate (default 1e-4)")
    compare.add_argument("--dpo-lr", type=float, default=5e-4, help="DPO learning rate (default 5e-4)")
    add_json_flag(compare)
    compare.set_defaults(handler=_rl_compare)

    trainer = subparsers.add_parser("train", help="run one training stage and publish its checkpoint")
    stage_sub = trainer.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in STAGES:
        p = stage_sub.add_parser(stage, help=f"the {stage} stage")
        common(p, with_name=stage != "tokenizer")
        if stage == "tokenizer":
            p.add_argument("--out", type=Path, required=True, help="directory for tokenizer.json")
        else:
            p.add_argument("--steps", type=int, default=None, help="override the preset's optimizer steps")
            p.add_argument("--lr", type=float, default=None, help="override the preset's peak learning rate")
            p.add_argument("--run-dir", type=Path, default=None,
                           help="metrics and resumable state (default $SOL_HOME/runs/<name>/<stage>)")
            p.add_argument("--fresh", action="store_true", help="ignore saved state instead of resuming")
            p.add_argument("--batch-size", type=int, default=None,
                           help="override the preset's micro-batch per process (RLHF: its minibatch)")
            p.add_argument("--log-every", type=int, default=None, help="override the preset's steps per metrics record")
            p.add_argument("--save-every", type=int, default=None,
                           help="write resumable state every N steps (default: only at the end)")
        if stage == "pretrain":
            p.add_argument("--tokenizer", type=Path, default=None,
                           help="directory with a tokenizer.json (default: train one)")
        if stage in ("sft", "reward", "dpo", "rlhf"):
            default = "NAME:base" if stage == "sft" else "NAME:sft"
            p.add_argument("--from", dest="parent", default=None, help=f"parent checkpoint (default {default})")
        if stage == "pretrain":
            p.add_argument("--from", dest="parent", default=None,
                           help="continue pretraining this checkpoint (needs --data)")
        if stage in ("pretrain", "sft", "reward", "dpo"):
            kind = {"pretrain": "text (.jsonl of {\"text\"} or .txt)", "sft": "chat SFT",
                    "reward": "preference", "dpo": "preference"}[stage]
            p.add_argument("--data", type=Path, default=None,
                           help=f"{kind} JSON Lines file to train on (default: the built-in tasks)")
            p.add_argument("--eval-data", type=Path, default=None,
                           help="held-out file of the same format (default: a tenth of --data, by --seed)")
        if stage == "dpo":
            p.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default 0.1)")
        if stage == "rlhf":
            p.add_argument("--reward", default=None,
                           help="rm:REF (a reward model; default NAME:rm) or python:MODULE:FUNCTION")
            p.add_argument("--prompts", type=Path, default=None,
                           help="RL prompts JSON Lines file (default: the built-in tasks)")
            p.add_argument("--eval-prompts", type=Path, default=None,
                           help="held-out prompts (default: a tenth of --prompts, by --seed)")
            p.add_argument("--algo", choices=("ppo", "grpo"), default="ppo", help="ppo (default) or grpo")
            p.add_argument("--group", type=int, default=None,
                           help="replies per prompt (GRPO's group; default: the preset's, at least 4 for grpo)")
            p.add_argument("--reward-timeout", type=float, default=10.0,
                           help="seconds one Python reward call may take (default 10)")
        if stage in ("sft", "dpo", "rlhf"):
            lora_training.add_flags(p)
        if stage != "tokenizer":
            p.add_argument("--skip-long", action="store_true",
                           help="leave out (and count) rows whose prompt alone fills the context instead of "
                                "refusing the file")
        add_json_flag(p)
        p.set_defaults(handler=_train)


def _threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _registry(args):
    from gpt.registry import Registry

    return Registry(args.registry)


def _runs_root(registry) -> Path:
    # Runs live beside the registry ($SOL_HOME/runs for the default $SOL_HOME/registry).
    return registry.root.parent / "runs"


def _pipeline(args) -> int:
    _threads(args)
    from gpt.registry import validate_name
    from training import distributed
    from training.pipeline import run_pipeline
    from training.presets import pipeline_preset

    validate_name(args.name)
    registry = _registry(args)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    summary = run_pipeline(pipeline_preset(args.preset), args.name, args.seed, registry, _runs_root(registry),
                           progress=not args.quiet, log=log)
    distributed.teardown()
    if "report" not in summary:      # not rank 0
        return 0
    m = summary["metrics"]
    rows = [[stage, summary["refs"][stage], f"{m[stage]['tasks']['accuracy']:.3f}"] for stage in ("base", "sft", "rlhf")]
    human = "\n".join([
        table(rows, ["stage", "checkpoint", "held-out accuracy"]),
        f"reward model {summary['refs']['rm']}: held-out pairwise accuracy {m['rm']['pairwise']['accuracy']:.3f}",
        f"KL to SFT at the end of RLHF: {m['rlhf']['final_kl']:.3f} nats/reply; "
        f"total time {summary['seconds']['total']:.0f} s (seed {summary['seed']})",
        f"report: {summary['report']}",
        "checkpoints: " + ", ".join(f"{k}={v}" for k, v in summary["checkpoints"].items()),
    ])
    emit(summary if args.json else None, args.json, human)
    return 0


def _rl_compare(args) -> int:
    from training.rl_compare import run_compare

    registry = _registry(args)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json or args.quiet else print
    summary = run_compare(args.parent.replace("NAME", args.name), args.name, registry.root, args.out, args.preset,
                          args.seed, args.rl_steps, args.eval_prompts, args.threads or 1,
                          tuple(f for f in args.families.split(",") if f), args.rl_lr, args.dpo_lr, log)
    rows = [[r["method"], r["procs"], r["samples"], f"{r['reward']:.3f}", f"{r['win_rate']:.3f}",
             f"{r['seconds']:.1f}"] for r in summary["rows"]]
    human = "\n".join([table(rows, ["method", "procs", "samples", "held-out acc", "win vs SFT", "wall s"]),
                       f"report: {summary['markdown']} and {summary['png']}"])
    emit(summary if args.json else None, args.json, human)
    return 0


def _train(args) -> int:
    _threads(args)
    from training import distributed
    from training.pipeline import Context
    from training.presets import pipeline_preset

    preset = pipeline_preset(args.preset).with_seed(args.seed)
    if args.stage == "tokenizer":
        from training.pipeline import stage_tokenizer

        ctx = Context(preset, "tokenizer", args.seed, _registry(args), args.out, distributed.setup(),
                      not args.quiet)
        tokenizer, _, _ = stage_tokenizer(ctx)
        out = Path(args.out) / "tokenizer"
        emit({"tokenizer": str(out / "tokenizer.json"), "vocab_size": tokenizer.vocab_size}, args.json,
             f"tokenizer with {tokenizer.vocab_size} tokens written to {out / 'tokenizer.json'}")
        return 0
    if args.stage in STAGE_CONFIG:
        key = STAGE_CONFIG[args.stage]
        cfg = getattr(preset, key)
        loop = cfg.loop
        if args.steps is not None:
            loop = dataclasses.replace(loop, steps=args.steps)
        if args.lr is not None:
            loop = dataclasses.replace(loop, lr=args.lr)
        if args.save_every is not None:
            loop = dataclasses.replace(loop, save_every=args.save_every)
        if args.batch_size is not None:
            loop = dataclasses.replace(loop, batch_size=args.batch_size)
        if args.log_every is not None:
            loop = dataclasses.replace(loop, log_every=args.log_every)
        setattr(preset, key, dataclasses.replace(cfg, loop=loop))
    from training.lora_training import from_args

    lora = from_args(args)            # bad LoRA flags fail here, before any model is loaded
    registry = _registry(args)
    run_dir = args.run_dir or _runs_root(registry) / args.name / "stages"
    info = distributed.setup()
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    ctx = Context(preset, args.name, args.seed, registry, Path(run_dir), info, not args.quiet,
                  log if info.is_main else (lambda _m: None), resume=not args.fresh, lora=lora)
    outcome = _run_stage(args, ctx, registry)
    distributed.teardown()
    if info.is_main:
        resolved = outcome.resolved
        heldout = {k: v for k, v in outcome.metrics.items() if k.startswith("eval_")}
        human = f"published {resolved.ref} ({outcome.stage}) at {resolved.path}"
        if heldout:
            human += "\nheld-out: " + ", ".join(f"{k} {v:.4f}" for k, v in heldout.items())
        emit({"stage": outcome.stage, "ref": resolved.ref, "path": str(resolved.path), **heldout,
              "metrics": outcome.metrics}, args.json, human)
    return 0


def _uses_own_data(args) -> bool:
    return (getattr(args, "data", None) is not None or getattr(args, "prompts", None) is not None
            or args.stage == "dpo" or (args.stage == "rlhf" and (args.algo == "grpo" or (
                args.reward or "").startswith("python:"))))


def _run_stage(args, ctx, registry):
    from gpt.checkpoint import load_checkpoint
    from gpt.tokenizer import SolTokenizer
    from training import pipeline
    from training.data.corpus import build_corpus
    from training.data.tasks import pretraining_documents
    from training.heads import RewardModel

    device = ctx.info.device
    if _uses_own_data(args):
        from training.own_data_commands import run_own_data_stage

        return run_own_data_stage(args, ctx, registry)
    if args.stage == "pretrain" and args.parent:
        raise ValueError("sol train pretrain --from REF continues pretraining on --data FILE; give --data")

    def load(ref: str):
        resolved = registry.resolve(ref.replace("NAME", args.name))
        return resolved, load_checkpoint(resolved.path, device=device)

    if args.stage == "pretrain":
        if args.tokenizer:
            tokenizer = SolTokenizer.load(args.tokenizer)
            corpus = build_corpus(ctx.preset.corpus_bytes)
            docs = pretraining_documents(ctx.preset.task_docs, ctx.preset.task_doc_problems, ctx.seed,
                                         ctx.preset.families)
        else:
            tokenizer, corpus, docs = pipeline.stage_tokenizer(ctx)
        return pipeline.stage_pretrain(ctx, tokenizer, corpus, docs)
    parent, ckpt = load(args.parent or ("NAME:base" if args.stage == "sft" else "NAME:sft"))
    if args.stage == "sft":
        return pipeline.stage_sft(ctx, ckpt.tokenizer, ckpt.model, parent.ref)
    if args.stage == "reward":
        return pipeline.stage_reward(ctx, ckpt.tokenizer, ckpt.model, parent.ref)
    rm_resolved, rm_ckpt = load(args.reward or "NAME:rm")
    rm = RewardModel.from_parts(rm_ckpt.model, rm_ckpt.heads)
    return pipeline.stage_rlhf(ctx, ckpt.tokenizer, ckpt.model, rm, parent.ref, rm_resolved.ref)
