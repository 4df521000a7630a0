"""The main job: tokenizer -> pretrain -> SFT -> reward model -> RLHF -> evaluation ->
report. Each stage is also a function `sol train <stage>` calls on its own; every
stage publishes a verified checkpoint with its alias and meta (parent, data fingerprint,
step, eval metrics)."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.chat import chat_prompt_ids
from gpt.checkpoint import load_checkpoint
from gpt.model import GPT
from gpt.registry import Registry, ResolvedModel, publish_checkpoint
from gpt.tokenizer import SolTokenizer, train_tokenizer
from server.engine.engine import Engine
from training import distributed
from training.data.corpus import Corpus, build_corpus
from training.data.tasks import (
    DEFAULT_FAMILIES,
    FAMILIES,
    YES_NO_FAMILIES,
    PreferenceSet,
    Problem,
    TaskSet,
    preference_pairs,
    pretraining_documents,
    sample_problems,
)
from training.data.tasks import fingerprint as task_fingerprint
from training.decoding import training_engine
from training.evaluate import perplexity, reward_accuracy, reward_ranking, structured_accuracy, task_accuracy
from training.heads import REWARD_HEAD, PolicyWithValue, RewardModel
from training.heldout import sft_loss
from training.loop import LoopResult, train
from training.lora_training import LoraTraining, as_gpt, reference, trainable
from training.lora_training import publish as publish_adapter_of
from training.presets import PipelinePreset
from training.stages.pretrain import PretrainStage, token_stream
from training.stages.reward import RewardStage, sample_wrong_replies
from training.stages.rlhf import RLHFStage
from training.stages.sft import SFTStage, sft_example

EVAL_SEED = 1234        # the held-out sets are the same whatever the training seed
RM_EVAL_SEED = 4321


@dataclass
class Context:
    preset: PipelinePreset
    name: str
    seed: int
    registry: Registry
    run_dir: Path
    info: distributed.DistInfo = field(default_factory=distributed.DistInfo)
    progress: bool = True
    log: Callable[[str], None] = print
    resume: bool = True
    lora: LoraTraining | None = None      # train an adapter instead of the whole model (--lora-rank)

    def stage_dir(self, stage: str) -> Path:
        # A LoRA run's resumable state (an adapter's) never mixes with a full run's.
        if self.lora is not None:
            stage = f"{stage}-lora-{self.lora.name}-r{self.lora.spec.rank}"
        return self.run_dir / stage


@dataclass
class StageOutcome:
    stage: str
    model: Any
    resolved: ResolvedModel | None
    metrics: dict[str, Any]
    seconds: float
    loop: LoopResult | None = None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _publish(ctx: Context, model: GPT, tokenizer: SolTokenizer, alias: str, meta: dict[str, Any],
             heads: dict[str, torch.Tensor] | None = None) -> ResolvedModel | None:
    """Rank 0 publishes; the others wait so that no rank reads a half-published registry.
    A LoRA stage publishes its adapter instead (training/lora_training.py)."""
    if ctx.lora is not None:
        return publish_adapter_of(ctx, model, alias, meta)  # type: ignore[arg-type]
    resolved = None
    if ctx.info.is_main:
        resolved = publish_checkpoint(ctx.registry, ctx.name, model, tokenizer,
                                      {"stage": alias, "seed": ctx.seed, "preset": ctx.preset.name, **meta},
                                      aliases=(alias,), heads=heads)
        # Reload what was written: a checkpoint the server would refuse fails the job here.
        load_checkpoint(resolved.path)
        ctx.log(f"published {resolved.ref} ({alias}) -> {resolved.path}")
    distributed.barrier(ctx.info)
    return resolved


def _ref(resolved: ResolvedModel | None) -> str | None:
    return resolved.ref if resolved else None


# --- stages -------------------------------------------------------------------------------------

def stage_tokenizer(ctx: Context) -> tuple[SolTokenizer, Corpus, list[str]]:
    p = ctx.preset
    corpus = build_corpus(p.corpus_bytes)
    task_docs = pretraining_documents(p.task_docs, p.task_doc_problems, ctx.seed, p.families)
    tokenizer = train_tokenizer(corpus.train + task_docs[: max(1, len(task_docs) // 4)], p.vocab_size,
                                show_progress=False)
    if ctx.info.is_main:
        out = ctx.stage_dir("tokenizer")
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out)
    return tokenizer, corpus, task_docs


def stage_pretrain(ctx: Context, tokenizer: SolTokenizer, corpus: Corpus, task_docs: list[str]) -> StageOutcome:
    p = ctx.preset
    began = time.perf_counter()
    torch.manual_seed(ctx.seed)
    model = GPT(p.model_config(tokenizer.vocab_size)).to(ctx.info.device)
    tokens = token_stream(tokenizer, corpus.train + task_docs, ctx.seed)
    stage = PretrainStage(tokens, p.pretrain, ctx.info.device)
    result = train(model, stage, p.pretrain.loop, ctx.stage_dir("pretrain"), ctx.info, ctx.progress, ctx.resume)
    metrics = evaluate_base(ctx, model, tokenizer, corpus)
    metrics["train_loss"] = result.last("loss")
    fingerprint = _digest(corpus.fingerprint, _digest(*task_docs), str(p.pretrain.seq_len))
    resolved = _publish(ctx, model, tokenizer, "base", {
        "parent": None, "step": result.step, "data_fingerprint": fingerprint, "metrics": metrics,
        "train_tokens": result.step * p.pretrain.loop.batch_size * p.pretrain.seq_len * ctx.info.world})
    return StageOutcome("base", model, resolved, metrics, time.perf_counter() - began, result)


def sft_problems(p: PipelinePreset, seed: int) -> TaskSet:
    """The demonstrations: SFT trains on them, and RLHF's PPO-ptx term reuses them."""
    return sample_problems(p.sft_per_family, "train", seed, p.families)


def stage_sft(ctx: Context, tokenizer: SolTokenizer, base: GPT, parent: str | None) -> StageOutcome:
    p = ctx.preset
    began = time.perf_counter()
    model = trainable(ctx, base)
    tasks = sft_problems(p, ctx.seed)
    stage = SFTStage(tokenizer, [q.conversation() for q in tasks.problems], p.sft, ctx.info.device)
    # The held-out problems' conversations: the loss on their assistant tokens, as the
    # stage reports it when trained from a file.
    heldout = [sft_example(tokenizer, q.conversation()) for q in eval_problems(p)]
    before = sft_loss(model, heldout, tokenizer.pad_id)
    result = train(model, stage, p.sft.loop, ctx.stage_dir("sft"), ctx.info, ctx.progress, ctx.resume)
    metrics = {"tasks": _task_eval(ctx, model, tokenizer, "chat"), "train_loss": result.last("loss"),
               "eval_loss_before": before, "eval_loss_after": sft_loss(model, heldout, tokenizer.pad_id)}
    resolved = _publish(ctx, model, tokenizer, "sft", {
        "parent": parent, "step": result.step, "data_fingerprint": tasks.fingerprint, "metrics": metrics})
    return StageOutcome("sft", model, resolved, metrics, time.perf_counter() - began, result)


def preference_problems(p: PipelinePreset, seed: int) -> tuple[list[Problem], list[Problem]]:
    """The reward model's training problems (training split) and held-out ones."""
    return (sample_problems(p.rm_per_family, "train", seed + 17, p.families).problems,
            sample_problems(p.rm_eval_per_family, "heldout", RM_EVAL_SEED, p.families, unique=True).problems)


REPLY_TOKENS = 24   # the longest reply a stage samples from the SFT model


def longest_chat_prompt(tokenizer: SolTokenizer, problems: list[Problem]) -> int:
    """Tokens in the longest of `problems` as a chat prompt: what a stage's sampling
    engine must hold besides the reply."""
    return max(len(chat_prompt_ids(tokenizer, [{"role": "user", "content": q.prompt}])) for q in problems)


def preference_data(ctx: Context, tokenizer: SolTokenizer, sft: GPT, engine: Engine | None = None
                    ) -> tuple[PreferenceSet, PreferenceSet]:
    """Training pairs from training-split problems and held-out pairs from held-out ones;
    rejected replies are the SFT model's own wrong samples where it made some (drawn by
    `engine`, one on `sft`, or one made here)."""
    p = ctx.preset
    train_problems, heldout_problems = preference_problems(p, ctx.seed)
    engine = engine or training_engine(sft, longest_chat_prompt(tokenizer, train_problems + heldout_problems) + REPLY_TOKENS)
    wrong_train = sample_wrong_replies(sft, tokenizer, train_problems, p.rm_samples, ctx.seed, engine=engine)
    wrong_eval = sample_wrong_replies(sft, tokenizer, heldout_problems, p.rm_samples, RM_EVAL_SEED, engine=engine)
    return (preference_pairs(train_problems, ctx.seed, wrong_train, p.rm_model_pairs),
            preference_pairs(heldout_problems, RM_EVAL_SEED, wrong_eval, p.rm_model_pairs))


def stage_reward(ctx: Context, tokenizer: SolTokenizer, sft: GPT, parent: str | None) -> StageOutcome:
    p = ctx.preset
    began = time.perf_counter()
    # One engine on the SFT policy for all of this stage's sampling: its KV pool is made once.
    train_problems, heldout_problems = preference_problems(p, ctx.seed)
    engine = training_engine(sft, longest_chat_prompt(tokenizer, [*train_problems, *heldout_problems, *eval_problems(p)])
                             + REPLY_TOKENS)
    train_pairs, eval_pairs = preference_data(ctx, tokenizer, sft, engine)
    rm = RewardModel(copy.deepcopy(sft)).to(ctx.info.device)
    stage = RewardStage(tokenizer, train_pairs.pairs, p.reward, ctx.info.device)
    before = reward_accuracy(rm, tokenizer, eval_pairs.pairs)
    result = train(rm, stage, p.reward.loop, ctx.stage_dir("reward"), ctx.info, ctx.progress, ctx.resume)
    after = reward_accuracy(rm, tokenizer, eval_pairs.pairs)
    metrics = {"pairwise": after, "train_loss": result.last("loss"),
               "eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
               "eval_accuracy_before": before["accuracy"], "eval_accuracy_after": after["accuracy"],
               "eval_accuracy": after["accuracy"],
               "train_pairs": len(train_pairs.pairs),
               "train_model_negatives": sum(pair.source == "model" for pair in train_pairs.pairs)}
    ctx.log(f"reward model held-out pairwise accuracy {metrics['pairwise']['accuracy']:.3f}")
    if p.rm_ranking_samples:
        # On the held-out problems whose greedy accuracy measures every stage, so that
        # best-of-n compares with the SFT row of the report.
        metrics["ranking"] = reward_ranking(sft, rm, tokenizer, eval_problems(ctx.preset), p.rm_ranking_samples,
                                            EVAL_SEED + 1, engine=engine)
        ctx.log(f"reward model best-of-{p.rm_ranking_samples} on the SFT policy's samples: " +
                " ".join(f"{f}={r['best_of_n']:.2f}" for f, r in metrics["ranking"].items()))
    resolved = _publish(ctx, rm.gpt, tokenizer, "rm", {
        "parent": parent, "step": result.step, "data_fingerprint": train_pairs.fingerprint, "metrics": metrics,
        "head": REWARD_HEAD}, heads=rm.heads())
    return StageOutcome("rm", rm, resolved, metrics, time.perf_counter() - began, result)


def rlhf_prompts(p: PipelinePreset, seed: int) -> TaskSet:
    """Training-split prompts for the rollouts, from the preset's RL families only, and
    (with `rlhf_unseen_prompts`) none of them an SFT demonstration: the SFT policy has
    memorised those answers, so its replies to them agree and carry no signal, and what
    PPO learns on them does not carry over to problems it has not seen.

    With `rlhf_balanced_answers`, a family whose answers are yes / no draws half of its
    prompts of each answer (after the other families'): leaving out the SFT
    demonstrations leaves few "yes" palindromes (SFT covers nearly every short one; 15% of
    the unseen draws are "yes" against 39% of the held-out problems), and PPO on such a
    set teaches the policy to say "no"."""
    exclude = ({(q.family, q.key) for q in sft_problems(p, seed).problems} if p.rlhf_unseen_prompts
               else frozenset())
    families = list(p.rl_families or DEFAULT_FAMILIES)
    balanced = [f for f in families if p.rlhf_balanced_answers and f in YES_NO_FAMILIES]
    others = [f for f in families if f not in balanced]
    problems: list[Problem] = []
    if others:     # (no families at all would mean every family to sample_problems)
        problems = sample_problems(p.rlhf_per_family, "train", seed + 29, others, exclude=exclude).problems
    half = p.rlhf_per_family // 2
    for family in balanced:
        # Repeats are allowed: the unseen "yes" problems are few, and each is drawn again.
        pool = sample_problems(8 * p.rlhf_per_family, "train", seed + 29, [family], exclude=exclude).problems
        for answer in ("yes", "no"):
            picked = [q for q in pool if q.answer == answer][:half]
            if len(picked) < half:
                raise ValueError(f"too few {answer!r} problems in family {family!r} for {half} RL prompts")
            problems += picked
    return TaskSet(problems, task_fingerprint(problems))


def stage_rlhf(ctx: Context, tokenizer: SolTokenizer, sft: GPT, rm: RewardModel, parent: str | None,
               rm_ref: str | None) -> StageOutcome:
    p = ctx.preset
    began = time.perf_counter()
    policy = PolicyWithValue(trainable(ctx, sft)).to(ctx.info.device)
    prompts = rlhf_prompts(p, ctx.seed)
    fingerprint = prompts.fingerprint
    demonstrations = None
    if p.rlhf.ptx_coef > 0:
        demos = sft_problems(p, ctx.seed)
        demonstrations = [q.conversation() for q in demos.problems]
        fingerprint = _digest(prompts.fingerprint, demos.fingerprint)
    stage = RLHFStage(policy, reference(ctx, sft, policy), rm, tokenizer, prompts.problems, p.rlhf, ctx.info.device,
                      demonstrations)
    result = train(policy, stage, p.rlhf.loop, ctx.stage_dir("rlhf"), ctx.info, ctx.progress, ctx.resume)
    if ctx.info.is_main:
        with (ctx.stage_dir("rlhf") / "rollouts.jsonl").open("a", encoding="utf-8") as f:
            for record in stage.history:
                f.write(json.dumps(record) + "\n")
    metrics = {"tasks": _task_eval(ctx, policy.gpt, tokenizer, "chat"), "rollouts": stage.history[-1:],
               "final_kl": stage.history[-1]["kl"] if stage.history else None, "kl_coef": stage.kl.value,
               "prompt_families": sorted({q.family for q in prompts.problems}), "ptx_coef": p.rlhf.ptx_coef}
    resolved = _publish(ctx, policy.gpt, tokenizer, "rlhf", {
        "parent": parent, "reward_model": rm_ref, "step": result.step, "data_fingerprint": fingerprint,
        "metrics": metrics}, heads=policy.heads())
    return StageOutcome("rlhf", policy.gpt, resolved, metrics, time.perf_counter() - began, result)


# --- evaluation helpers -----------------------------------------------------------------------

def eval_problems(p: PipelinePreset) -> list[Problem]:
    return sample_problems(p.eval_per_family, "heldout", EVAL_SEED, p.families, unique=True).problems


def _task_eval(ctx: Context, model: GPT, tokenizer: SolTokenizer, mode: str) -> dict[str, Any]:
    model = as_gpt(model)         # the engine runs a GPT: a LoRA stage's adapter merged into a copy
    problems = eval_problems(ctx.preset)
    acc = task_accuracy(model, tokenizer, problems, mode, shots_seed=EVAL_SEED)
    ctx.log(f"held-out task accuracy ({mode}): {acc.accuracy:.3f} " +
            " ".join(f"{k}={v:.2f}" for k, v in acc.per_family.items()))
    out = {**acc.to_dict(), "samples": acc.samples}
    if mode == "chat" and any(FAMILIES[f].answer_schema for f in acc.per_family):
        # Families answered in JSON: the same held-out problems, free and under their schema.
        out["structured"] = structured_accuracy(model, tokenizer, problems)
        for family, row in out["structured"].items():
            ctx.log(f"{family}: JSON {row['free_json']:.2f} -> {row['constrained_json']:.2f}, accuracy "
                    f"{row['free_accuracy']:.2f} -> {row['constrained_accuracy']:.2f} (free -> constrained)")
    return out


def evaluate_base(ctx: Context, model: GPT, tokenizer: SolTokenizer, corpus: Corpus) -> dict[str, Any]:
    ppl = perplexity(model, tokenizer, corpus.heldout, max_tokens=ctx.preset.perplexity_tokens)
    ctx.log(f"base perplexity on held-out text: {ppl:.2f}")
    return {"perplexity": ppl, "tasks": _task_eval(ctx, model, tokenizer, "base")}


# --- the whole job ----------------------------------------------------------------------------

def run_pipeline(preset: PipelinePreset, name: str, seed: int, registry: Registry, runs_root: Path,
                 progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage and write the report; returns the summary (also summary.json)."""
    from training.report import write_report

    info = distributed.setup()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(runs_root) / name / f"{stamp}-seed{seed}"
    ctx = Context(preset.with_seed(seed), name, seed, registry, run_dir, info, progress,
                  log if info.is_main else (lambda _msg: None), resume=False)
    began = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    tokenizer, corpus, task_docs = stage_tokenizer(ctx)
    timings["tokenizer"] = time.perf_counter() - t
    ctx.log(f"tokenizer: {tokenizer.vocab_size} tokens ({timings['tokenizer']:.0f}s)")
    base = stage_pretrain(ctx, tokenizer, corpus, task_docs)
    sft = stage_sft(ctx, tokenizer, base.model, _ref(base.resolved))
    rm = stage_reward(ctx, tokenizer, sft.model, _ref(sft.resolved))
    rlhf = stage_rlhf(ctx, tokenizer, sft.model, rm.model, _ref(sft.resolved), _ref(rm.resolved))
    for outcome in (base, sft, rm, rlhf):
        timings[outcome.stage] = outcome.seconds
    timings["total"] = time.perf_counter() - began

    summary = {
        "name": name, "seed": seed, "preset": preset.name, "run_dir": str(run_dir),
        "model": ctx.preset.model_config(tokenizer.vocab_size).to_dict(),
        "num_parameters": base.model.num_parameters(),
        "torch_threads": torch.get_num_threads(), "world_size": info.world, "device": str(info.device),
        "checkpoints": {o.stage: (str(o.resolved.path) if o.resolved else None) for o in (base, sft, rm, rlhf)},
        "refs": {o.stage: _ref(o.resolved) for o in (base, sft, rm, rlhf)},
        "metrics": {o.stage: o.metrics for o in (base, sft, rm, rlhf)},
        "seconds": timings,
    }
    if info.is_main:
        report_dir = registry.model_dir(name) / "reports" / f"{stamp}-seed{seed}"
        summary["report"] = str(write_report(summary, run_dir, report_dir))
    return summary
