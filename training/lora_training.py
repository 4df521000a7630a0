"""Training a LoRA adapter instead of the whole model: `sol train sft|dpo|rlhf --lora-rank R`.

Everything LoRA-specific of the training stages is here, so a stage only asks three
things: the model to train (`trainable`: a copy of its start, or the start frozen under
a fresh adapter), its frozen reference (`reference`: a copy, or the very same base with
the adapter off — DPO and RLHF then hold one model's weights instead of two), and a GPT
for the evaluations that run the serving engine (`as_gpt`: the adapter merged into a
copy). `publish` writes the adapter as a registry entry of its own name, in PEFT's
format, naming the base version it was trained on (gpt/adapter_store.py), so
`sol serve` serves it by name at once and PEFT/vLLM load the same files.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from gpt.adapter_store import is_adapter, load_published_adapter, publish_adapter
from gpt.lora import TARGETS, AdapterError, LoraSpec, merge_into, parse_targets
from gpt.lora_trainable import LoraModel
from gpt.model import GPT
from gpt.registry import ResolvedModel, validate_name
from server.engine.adapter_slots import AdapterRef
from server.engine.config import EngineConfig
from training import distributed

DEFAULT_TARGETS = ",".join(TARGETS)
# The rank a server serves by default (sol serve --max-lora-rank): an adapter above the
# limit it will be served under is refused before training, not after.
SERVED_MAX_RANK: int = {f.name: f.default for f in dataclasses.fields(EngineConfig)}["max_lora_rank"]


@dataclass(frozen=True)
class LoraTraining:
    spec: LoraSpec
    name: str              # the adapter's registry name
    dropout: float = 0.0


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (train an adapter; the base stays frozen)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train a LoRA adapter of this rank instead of the whole model")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank; scale alpha/rank)")
    g.add_argument("--lora-targets", default=DEFAULT_TARGETS,
                   help=f"projections to adapt, comma-separated among {DEFAULT_TARGETS} (default all)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input (default 0)")
    g.add_argument("--adapter-name", default=None,
                   help="the adapter's registry name (default NAME-STAGE-lora); requests name it as their model")
    g.add_argument("--max-lora-rank", type=int, default=SERVED_MAX_RANK,
                   help=f"the rank limit of the server that will serve it (default {SERVED_MAX_RANK}, "
                        "sol serve's --max-lora-rank)")


def from_args(args: argparse.Namespace) -> LoraTraining | None:
    """The LoRA request of a `sol train` command, checked (AdapterError naming the flag);
    None without --lora-rank."""
    rank = getattr(args, "lora_rank", None)
    if rank is None:
        if getattr(args, "adapter_name", None) or getattr(args, "lora_alpha", None) is not None:
            raise AdapterError("--adapter-name and --lora-alpha need --lora-rank (the adapter's rank)")
        return None
    if rank < 1:
        raise AdapterError(f"--lora-rank must be at least 1 (got {rank})")
    if rank > args.max_lora_rank:
        raise AdapterError(f"--lora-rank {rank} is above the serving limit of {args.max_lora_rank} "
                           "(--max-lora-rank, as sol serve's): the server would refuse the adapter")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise AdapterError(f"--lora-dropout must be in [0, 1) (got {args.lora_dropout})")
    try:
        spec = LoraSpec(rank, args.lora_alpha if args.lora_alpha is not None else 2.0 * rank,
                        parse_targets(args.lora_targets))
    except AdapterError as err:
        raise AdapterError(f"--lora-*: {err}") from None
    name = args.adapter_name or f"{args.name}-{args.stage}-lora"
    validate_name(name)
    return LoraTraining(spec, name, args.lora_dropout)


def trainable(ctx: Any, start: GPT) -> nn.Module:
    """The model a stage trains: a copy of `start`, or (with LoRA) `start` itself frozen
    under a fresh adapter (no copy: its weights never change)."""
    lora: LoraTraining | None = getattr(ctx, "lora", None)
    if lora is None:
        return copy.deepcopy(start)
    model = LoraModel(start, lora.spec, lora.dropout, seed=ctx.seed)
    ctx.log(f"LoRA rank {lora.spec.rank} on {','.join(lora.spec.targets)}: {model.trainable_parameters():,} "
            f"trainable parameters of {start.num_parameters():,} (the base is frozen)")
    return model


def reference(ctx: Any, start: GPT, policy: nn.Module) -> GPT:
    """A stage's frozen reference: a copy of `start`, or the LoRA policy's own base (the
    same weights, which never change, with the adapter off)."""
    gpt = getattr(policy, "gpt", policy)          # PolicyWithValue wraps the LM
    if isinstance(gpt, LoraModel):
        return gpt.base
    return copy.deepcopy(start).eval().requires_grad_(False)


def as_gpt(model: nn.Module) -> GPT:
    """A GPT for what runs the serving engine (task evaluations, greedy replies): the
    model itself, or its adapter merged into a copy of the base."""
    if isinstance(model, LoraModel):
        return merge_into(copy.deepcopy(model.base), model.adapter())
    return model  # type: ignore[return-value]


def rollout_adapters(gpt: nn.Module, rows: int) -> list[AdapterRef | None] | None:
    """The adapter a LoRA policy's rollouts decode with (its weights now, a new version
    per call, so the engine loads them afresh and no cached prefix of older weights
    matches); None for a full model (the engine decodes its live weights)."""
    if not isinstance(gpt, LoraModel):
        return None
    gpt.version += 1
    return [AdapterRef("rollout", gpt.version, gpt.adapter())] * rows


def publish(ctx: Any, model: LoraModel, alias: str, meta: dict[str, Any]) -> ResolvedModel | None:
    """Rank 0 publishes the adapter as the next version of its own name, made for the
    stage's parent (`meta["parent"]`, NAME@VERSION), and reads it back as the server will."""
    lora: LoraTraining = ctx.lora
    resolved = None
    if ctx.info.is_main:
        base = ctx.registry.resolve(meta["parent"])
        if is_adapter(base.path):
            raise AdapterError(f"{base.ref} is an adapter: train on a full model (sol models merge it first)")
        full = {**meta, "stage": alias, "seed": ctx.seed, "preset": ctx.preset.name,
                "trainable_parameters": model.trainable_parameters(), "lora_dropout": lora.dropout}
        resolved = publish_adapter(ctx.registry, lora.name, model.adapter(), base, full, aliases=(alias,))
        load_published_adapter(resolved.path, ctx.registry, model.config)
        ctx.log(f"published adapter {resolved.ref} ({alias}, on {base.ref}) -> {resolved.path}")
    distributed.barrier(ctx.info)
    return resolved
