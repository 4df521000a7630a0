"""`sol train <stage>` on a user's own files: turns the command's flags into the data,
reward and config that training/own_data.py's stage functions take. Every file is read
and checked (and a Python reward function loaded and called once) before any training."""

from __future__ import annotations

import dataclasses

from gpt.checkpoint import load_checkpoint
from training.own_data import (
    DataArgs,
    Reward,
    prepare_prefs,
    prepare_prompts,
    prepare_sft,
    prepare_text,
    stage_dpo,
    stage_pretrain_data,
    stage_reward_data,
    stage_rlhf_data,
    stage_sft_data,
)
from training.rewards import PYTHON_PREFIX, RM_PREFIX, RewardFunction
from training.stages.dpo import DPOConfig

GRPO_MIN_GROUP = 4


def _load(registry, ref: str, name: str, device):
    resolved = registry.resolve(ref.replace("NAME", name))
    return resolved, load_checkpoint(resolved.path, device=device)


def run_own_data_stage(args, ctx, registry):
    device = ctx.info.device
    default_parent = {"pretrain": None, "sft": "NAME:base"}.get(args.stage, "NAME:sft")
    parent_ref = args.parent or default_parent
    if parent_ref is None:
        raise ValueError("sol train pretrain --data FILE continues a checkpoint: give --from REF")
    parent, ckpt = _load(registry, parent_ref, args.name, device)
    tokenizer, model = ckpt.tokenizer, ckpt.model
    context = model.config.max_seq_len
    data_args = DataArgs(getattr(args, "data", None), getattr(args, "eval_data", None), args.skip_long)

    if args.stage == "pretrain":
        docs, heldout = prepare_text(data_args, ctx.seed)
        return stage_pretrain_data(ctx, tokenizer, model, parent.ref, data_args, docs, heldout)
    if args.stage == "sft":
        data, heldout = prepare_sft(data_args, tokenizer, context, ctx.seed)
        return stage_sft_data(ctx, tokenizer, model, parent.ref, data_args, data, heldout)
    if args.stage in ("reward", "dpo"):
        data, heldout = prepare_prefs(ctx, data_args, tokenizer, context)
        if args.stage == "reward":
            return stage_reward_data(ctx, tokenizer, model, parent.ref, data_args, data, heldout)
        cfg = DPOConfig(beta=args.beta)
        cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, seed=ctx.seed,
                                                                steps=args.steps or cfg.loop.steps,
                                                                lr=args.lr or cfg.loop.lr,
                                                                save_every=args.save_every or 0,
                                                                batch_size=args.batch_size or cfg.loop.batch_size,
                                                                log_every=args.log_every or cfg.loop.log_every))
        return stage_dpo(ctx, tokenizer, model, parent.ref, data_args, data, heldout, cfg)

    # rlhf
    rl = ctx.preset.rlhf
    group = args.group or (max(GRPO_MIN_GROUP, rl.samples_per_prompt) if args.algo == "grpo"
                           else rl.samples_per_prompt)
    # No demonstrations of the user's task here, so no PPO-ptx term; a group is drawn
    # fresh per prompt, so nothing is oversampled.
    ctx.preset.rlhf = dataclasses.replace(rl, algo=args.algo, samples_per_prompt=group, ptx_coef=0.0,
                                          prompt_oversample=1)
    data_args = DataArgs(args.prompts, args.eval_prompts, args.skip_long)
    data, heldout = prepare_prompts(ctx, data_args, tokenizer, context, rl.max_new_tokens)
    spec = args.reward or "NAME:rm"
    if spec.startswith(PYTHON_PREFIX):
        reward = Reward(tokenizer, function=RewardFunction.load(spec, args.reward_timeout))
        reward_ref = spec
    else:
        from training.heads import RewardModel

        rm_resolved, rm_ckpt = _load(registry, spec.removeprefix(RM_PREFIX), args.name, device)
        if not rm_ckpt.heads:
            raise ValueError(f"{rm_resolved.ref} has no reward head: give a checkpoint from sol train reward")
        reward = Reward(tokenizer, model=RewardModel.from_parts(rm_ckpt.model, rm_ckpt.heads))
        reward_ref = rm_resolved.ref
    reward.check(data.prompts[0])
    return stage_rlhf_data(ctx, tokenizer, model, parent.ref, data_args, data, heldout, reward, reward_ref)
