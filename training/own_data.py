"""The stages on users' own files: `sol train sft|reward|dpo|rlhf|pretrain --data FILE`.

Everything is read, checked and encoded before a model is trained (a bad row stops the
stage with its FILE:LINE and nothing is published). Without `--eval-data` a held-out
tenth of the rows (training.datasets.split, deterministic by the seed) is set aside, and
every stage measures it before and after training: `eval_loss_before` /
`eval_loss_after` (SFT and text: next-token loss on the trained tokens; reward model:
pairwise loss, and `eval_accuracy_*`; DPO: the DPO loss, and `eval_accuracy_*`, the
share of pairs the policy's implicit reward orders right) and, for RL,
`eval_reward_before` / `eval_reward_after`, the mean reward of greedy replies.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gpt.model import GPT
from gpt.tokenizer import SolTokenizer
from training.datasets.prefs import PrefsData, encode_prefs, read_prefs
from training.datasets.prompts import PromptRow, PromptsData, encode_prompts, read_prompts
from training.datasets.rows import Row
from training.datasets.sft import SFTData, encode_sft, read_sft
from training.datasets.split import heldout_split
from training.datasets.text import Document, read_text
from training.heads import REWARD_HEAD, PolicyWithValue, RewardModel
from training.heldout import greedy_replies, reward_pairs_eval, reward_sequences, sft_loss, text_loss
from training.loop import LoopResult, train
from training.lora_training import as_gpt, reference, trainable
from training.pipeline import Context, StageOutcome, _publish
from training.rewards import RewardFunction, problem_row
from training.stages.dpo import DPOConfig, DPOStage, dpo_eval
from training.stages.pretrain import PretrainStage, token_stream
from training.stages.reward import RewardStage, score_batch
from training.stages.rlhf import RLHFStage, Scorer
from training.stages.sft import SFTStage

BUILTIN = "<built-in tasks>"


@dataclass
class DataArgs:
    """Where a stage's rows come from."""

    data: Path | None = None          # None: the built-in tasks
    eval_data: Path | None = None     # None: a held-out part of `data`
    skip_long: bool = False           # leave out (and count) rows whose prompt fills the context


def file_digest(*paths: Path | None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            digest.update(Path(path).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _read_split(args: DataArgs, read: Callable[[Path], list], seed: int,
                builtin: Callable[[], tuple[list, list]] | None = None) -> tuple[str, list, list]:
    """(path, training rows, held-out rows): `--data` read with `read` and split by `seed`
    unless `--eval-data` is given; `builtin()` when no file is (the built-in tasks)."""
    if args.data is None:
        assert builtin is not None, "this stage needs --data"
        train_rows, held = builtin()
        return BUILTIN, train_rows, held
    rows = read(args.data)
    if args.eval_data:
        return str(args.data), rows, read(args.eval_data)
    return str(args.data), *heldout_split(rows, seed, str(args.data))


def _run_dir(ctx: Context, stage: str, args: DataArgs, parent: str | None) -> Path:
    """A run directory per stage, data and starting checkpoint: resuming picks up a run
    on the same files from the same model only, never another's optimizer state."""
    key = hashlib.sha256(f"{file_digest(args.data, args.eval_data)}\0{parent}".encode()).hexdigest()[:12]
    return ctx.stage_dir(f"{stage}-{key}")


def _tokens_per_s(result: LoopResult) -> float | None:
    rates = [r["tokens_per_s"] for r in result.history if "tokens_per_s" in r]
    return sum(rates) / len(rates) if rates else None


def _data_meta(args: DataArgs, counts: dict[str, Any], fraction_note: str | None = None) -> dict[str, Any]:
    return {"data": str(args.data) if args.data else BUILTIN,
            "eval_data": str(args.eval_data) if args.eval_data else fraction_note or "held-out split", **counts}


def _loop(cfg: Any, steps: int | None) -> Any:
    return cfg if steps is None else replace(cfg, loop=replace(cfg.loop, steps=steps))


# --- SFT ---------------------------------------------------------------------------------------

def prepare_sft(args: DataArgs, tokenizer: SolTokenizer, context: int, seed: int) -> tuple[SFTData, SFTData]:
    path, train_rows, held = _read_split(args, read_sft, seed)
    return (encode_sft(path, train_rows, tokenizer, context, args.skip_long),
            encode_sft(str(args.eval_data or path), held, tokenizer, context, args.skip_long))


def stage_sft_data(ctx: Context, tokenizer: SolTokenizer, base: GPT, parent: str | None, args: DataArgs,
                   data: SFTData, heldout: SFTData) -> StageOutcome:
    began = time.perf_counter()
    model = trainable(ctx, base)
    pad = tokenizer.pad_id
    before = sft_loss(model, heldout.examples, pad)
    stage = SFTStage(tokenizer, [], ctx.preset.sft, ctx.info.device, examples=data.examples)
    result = train(model, stage, ctx.preset.sft.loop, _run_dir(ctx, "sft", args, parent), ctx.info, ctx.progress,
                   ctx.resume)
    after = sft_loss(model, heldout.examples, pad)
    ctx.log(f"held-out SFT loss {before:.4f} -> {after:.4f} ({len(heldout.examples)} rows)")
    metrics = {"eval_loss_before": before, "eval_loss_after": after, "train_loss": result.last("loss"),
               "tokens_per_s": _tokens_per_s(result),
               "data": _data_meta(args, {"train": data.counts.to_dict(), "heldout": heldout.counts.to_dict()})}
    resolved = _publish(ctx, model, tokenizer, "sft", {
        "parent": parent, "step": result.step, "data_fingerprint": file_digest(args.data, args.eval_data),
        "metrics": metrics})
    return StageOutcome("sft", model, resolved, metrics, time.perf_counter() - began, result)


# --- preference pairs: reward model and DPO ----------------------------------------------------

def builtin_preference_rows(ctx: Context) -> tuple[list, list]:
    """The built-in tasks' preference pairs (canonical answer over a corruption) as rows
    of the preference format: the default of `sol train dpo` without --data."""
    from training.data.tasks import preference_pairs
    from training.datasets.prefs import parse_preference
    from training.pipeline import RM_EVAL_SEED, preference_problems

    train_problems, heldout_problems = preference_problems(ctx.preset, ctx.seed)
    out = []
    for problems, seed in ((train_problems, ctx.seed), (heldout_problems, RM_EVAL_SEED)):
        pairs = preference_pairs(problems, seed).pairs
        out.append([parse_preference(Row(BUILTIN, i + 1, {"prompt": p.problem.prompt, "chosen": p.chosen,
                                                          "rejected": p.rejected}))
                    for i, p in enumerate(pairs)])
    return out[0], out[1]


def prepare_prefs(ctx: Context, args: DataArgs, tokenizer: SolTokenizer, context: int
                  ) -> tuple[PrefsData, PrefsData]:
    path, train_rows, held = _read_split(args, read_prefs, ctx.seed, lambda: builtin_preference_rows(ctx))
    return (encode_prefs(path, train_rows, tokenizer, context, args.skip_long),
            encode_prefs(str(args.eval_data or path), held, tokenizer, context, args.skip_long))


def _pairs_meta(args: DataArgs, data: PrefsData, heldout: PrefsData) -> dict[str, Any]:
    return _data_meta(args, {"train": data.counts.to_dict(), "heldout": heldout.counts.to_dict()})


def stage_reward_data(ctx: Context, tokenizer: SolTokenizer, sft: GPT, parent: str | None, args: DataArgs,
                      data: PrefsData, heldout: PrefsData) -> StageOutcome:
    began = time.perf_counter()
    rm = RewardModel(copy.deepcopy(sft)).to(ctx.info.device)
    pad = tokenizer.pad_id
    before = reward_pairs_eval(rm, heldout.pairs, pad)
    stage = RewardStage(tokenizer, [], ctx.preset.reward, ctx.info.device, encoded=reward_sequences(data.pairs))
    result = train(rm, stage, ctx.preset.reward.loop, _run_dir(ctx, "reward", args, parent), ctx.info, ctx.progress,
                   ctx.resume)
    after = reward_pairs_eval(rm, heldout.pairs, pad)
    ctx.log(f"held-out pairwise accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
            f"loss {before['loss']:.4f} -> {after['loss']:.4f} ({len(heldout.pairs)} pairs)")
    metrics = {"eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
               "eval_accuracy_before": before["accuracy"], "eval_accuracy_after": after["accuracy"],
               "eval_accuracy": after["accuracy"], "pairwise": after, "train_loss": result.last("loss"),
               "tokens_per_s": _tokens_per_s(result), "data": _pairs_meta(args, data, heldout)}
    resolved = _publish(ctx, rm.gpt, tokenizer, "rm", {
        "parent": parent, "step": result.step, "data_fingerprint": file_digest(args.data, args.eval_data),
        "metrics": metrics, "head": REWARD_HEAD}, heads=rm.heads())
    return StageOutcome("rm", rm, resolved, metrics, time.perf_counter() - began, result)


def stage_dpo(ctx: Context, tokenizer: SolTokenizer, start: GPT, parent: str | None, args: DataArgs,
              data: PrefsData, heldout: PrefsData, cfg: DPOConfig) -> StageOutcome:
    """DPO from `start`, which is also the frozen reference."""
    began = time.perf_counter()
    policy = trainable(ctx, start)
    ref_model = reference(ctx, start, policy)     # with LoRA: the policy's own base, adapter off (no copy)
    pad = tokenizer.pad_id
    stage = DPOStage(ref_model, data.pairs, pad, cfg, ctx.info.device)
    held_ref = DPOStage(ref_model, heldout.pairs, pad, cfg, ctx.info.device).ref
    before = dpo_eval(policy, held_ref, heldout.pairs, pad, cfg.beta)
    result = train(policy, stage, cfg.loop, _run_dir(ctx, "dpo", args, parent), ctx.info, ctx.progress, ctx.resume)
    after = dpo_eval(policy, held_ref, heldout.pairs, pad, cfg.beta)
    ctx.log(f"held-out DPO loss {before['loss']:.4f} -> {after['loss']:.4f}, preference accuracy "
            f"{before['accuracy']:.3f} -> {after['accuracy']:.3f} ({len(heldout.pairs)} pairs)")
    metrics = {"eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
               "eval_accuracy_before": before["accuracy"], "eval_accuracy_after": after["accuracy"],
               "eval_likelihood_accuracy_before": before["likelihood_accuracy"],
               "eval_likelihood_accuracy_after": after["likelihood_accuracy"],
               "beta": cfg.beta, "train_loss": result.last("loss"), "tokens_per_s": _tokens_per_s(result),
               "data": _pairs_meta(args, data, heldout)}
    resolved = _publish(ctx, policy, tokenizer, "dpo", {
        "parent": parent, "reference": parent, "step": result.step,
        "data_fingerprint": file_digest(args.data, args.eval_data), "metrics": metrics})
    return StageOutcome("dpo", policy, resolved, metrics, time.perf_counter() - began, result)


# --- RL on prompts -----------------------------------------------------------------------------

def builtin_prompt_rows(ctx: Context) -> tuple[list[PromptRow], list[PromptRow]]:
    """The built-in RL prompts and held-out problems as prompt rows (their family, key and
    answer are the fields `training.rewards:builtin_tasks` checks)."""
    from training.datasets.prompts import parse_prompt
    from training.pipeline import eval_problems, rlhf_prompts

    def rows(problems: list) -> list[PromptRow]:
        return [parse_prompt(Row(BUILTIN, i + 1, problem_row(p))) for i, p in enumerate(problems)]

    return rows(rlhf_prompts(ctx.preset, ctx.seed).problems), rows(eval_problems(ctx.preset))


def prepare_prompts(ctx: Context, args: DataArgs, tokenizer: SolTokenizer, context: int, max_new_tokens: int
                    ) -> tuple[PromptsData, PromptsData]:
    path, train_rows, held = _read_split(args, read_prompts, ctx.seed, lambda: builtin_prompt_rows(ctx))
    return (encode_prompts(path, train_rows, tokenizer, context, max_new_tokens, args.skip_long),
            encode_prompts(str(args.eval_data or path), held, tokenizer, context, max_new_tokens, args.skip_long))


class Reward:
    """Scores replies to prompt rows with a Python reward function or a reward model."""

    def __init__(self, tokenizer: SolTokenizer, function: RewardFunction | None = None,
                 model: RewardModel | None = None) -> None:
        if (function is None) == (model is None):
            raise ValueError("a reward is a Python function or a reward model, not both or neither")
        self.tokenizer, self.function, self.model = tokenizer, function, model

    def check(self, row: PromptRow) -> None:
        """The contract's first call, before any training: the function runs on the
        first prompt (with an empty completion) and returns a finite number."""
        if self.function is not None:
            self.function(row.messages, "", row.row.data, row.where)

    def scorer(self, data: PromptsData) -> Scorer | None:
        """For RLHFStage: None means the stage scores with `self.model` itself."""
        if self.function is None:
            return None
        fn = self.function

        def score(picks: list[int], texts: list[str], finished: list[bool]) -> list[float]:
            return [fn(data.prompts[i].messages, text, data.prompts[i].row.data, data.prompts[i].where)
                    for i, text in zip(picks, texts, strict=True)]
        return score

    @torch.no_grad()
    def mean_greedy(self, policy: GPT, data: PromptsData, max_new_tokens: int) -> float:
        """Mean reward of the policy's greedy replies to every prompt of `data`."""
        ids, texts = greedy_replies(as_gpt(policy), self.tokenizer, data.ids, max_new_tokens)
        if self.function is not None:
            scores = [self.function(p.messages, t, p.row.data, p.where)
                      for p, t in zip(data.prompts, texts, strict=True)]
            return sum(scores) / len(scores)
        assert self.model is not None
        device = next(self.model.parameters()).device
        seqs = [(prompt + (reply or [self.tokenizer.end_of_turn_id]), len(prompt))
                for prompt, reply in zip(data.ids, ids, strict=True)]
        total = 0.0
        for i in range(0, len(seqs), 64):
            total += self.model(*score_batch(seqs[i:i + 64], self.tokenizer.pad_id, device)).sum().item()
        return total / len(seqs)


def stage_rlhf_data(ctx: Context, tokenizer: SolTokenizer, sft: GPT, parent: str | None, args: DataArgs,
                    data: PromptsData, heldout: PromptsData, reward: Reward, reward_ref: str) -> StageOutcome:
    """PPO or GRPO (ctx.preset.rlhf.algo) on prompt rows, KL to `sft`."""
    began = time.perf_counter()
    cfg = ctx.preset.rlhf
    policy = PolicyWithValue(trainable(ctx, sft)).to(ctx.info.device)
    before = reward.mean_greedy(policy.gpt, heldout, cfg.max_new_tokens)
    stage = RLHFStage(policy, reference(ctx, sft, policy), reward.model, tokenizer, None, cfg, ctx.info.device,
                      prompt_ids=data.ids, scorer=reward.scorer(data))
    result = train(policy, stage, cfg.loop, _run_dir(ctx, f"rlhf-{cfg.algo}", args, parent), ctx.info,
                   ctx.progress, ctx.resume)
    after = reward.mean_greedy(policy.gpt, heldout, cfg.max_new_tokens)
    ctx.log(f"held-out mean reward (greedy) {before:.4f} -> {after:.4f} ({len(heldout.ids)} prompts, {cfg.algo})")
    metrics = {"eval_reward_before": before, "eval_reward_after": after, "algo": cfg.algo,
               "samples_per_prompt": cfg.samples_per_prompt, "rollouts": stage.history[-1:],
               "final_kl": stage.history[-1]["kl"] if stage.history else None,
               "tokens_per_s": _tokens_per_s(result),
               "data": _data_meta(args, {"train": data.counts.to_dict(), "heldout": heldout.counts.to_dict()})}
    if reward.function is not None:
        metrics["reward_calls"] = reward.function.calls
        metrics["reward_seconds"] = reward.function.seconds
    resolved = _publish(ctx, policy.gpt, tokenizer, "rlhf", {
        "parent": parent, "reward_model": reward_ref, "step": result.step,
        "data_fingerprint": file_digest(args.data, args.eval_data), "metrics": metrics},
        heads=policy.heads() if cfg.algo == "ppo" else None)
    return StageOutcome("rlhf", policy.gpt, resolved, metrics, time.perf_counter() - began, result)


# --- continued pretraining on text ---------------------------------------------------------------

def prepare_text(args: DataArgs, seed: int) -> tuple[list[Document], list[Document]]:
    """Training and held-out documents. One document alone is split by its text: the last
    tenth of its characters is held out."""
    assert args.data is not None
    docs = read_text(args.data)
    if args.eval_data:
        return docs, read_text(args.eval_data)
    if len(docs) == 1:
        doc = docs[0]
        cut = max(1, math.floor(len(doc.text) * 0.9))
        return [replace(doc, text=doc.text[:cut])], [replace(doc, text=doc.text[cut:])]
    return heldout_split(docs, seed, str(args.data))


def stage_pretrain_data(ctx: Context, tokenizer: SolTokenizer, start: GPT, parent: str | None, args: DataArgs,
                        docs: list[Document], heldout: list[Document]) -> StageOutcome:
    began = time.perf_counter()
    cfg = ctx.preset.pretrain
    seq_len = min(cfg.seq_len, start.config.max_seq_len)
    cfg = replace(cfg, seq_len=seq_len)
    tokens = token_stream(tokenizer, [d.text for d in docs], ctx.seed)
    held_tokens = token_stream(tokenizer, [d.text for d in heldout], ctx.seed)
    if tokens.numel() <= seq_len + 1:
        raise ValueError(f"{args.data}:1: text: expected more than {seq_len + 1} tokens of training text "
                         f"(one window), got {tokens.numel()}")
    window = min(seq_len, max(1, held_tokens.numel() - 1))
    model = copy.deepcopy(start)
    before = text_loss(model, held_tokens, window)
    run_dir = _run_dir(ctx, "pretrain", args, parent)
    result = train(model, PretrainStage(tokens, cfg, ctx.info.device), cfg.loop, run_dir, ctx.info, ctx.progress,
                   ctx.resume)
    after = text_loss(model, held_tokens, window)
    ctx.log(f"held-out text loss {before:.4f} -> {after:.4f}")
    counts = {"train": {"rows": len(docs), "tokens": tokens.numel()},
              "heldout": {"rows": len(heldout), "tokens": held_tokens.numel()}}
    metrics = {"eval_loss_before": before, "eval_loss_after": after, "train_loss": result.last("loss"),
               "tokens_per_s": _tokens_per_s(result), "data": _data_meta(args, counts)}
    resolved = _publish(ctx, model, tokenizer, "base", {
        "parent": parent, "step": result.step, "data_fingerprint": file_digest(args.data, args.eval_data),
        "metrics": metrics, "train_tokens": result.step * cfg.loop.batch_size * seq_len * ctx.info.world})
    return StageOutcome("base", model, resolved, metrics, time.perf_counter() - began, result)

