"""Batched generation for evaluation and RLHF rollouts.

Prompts of different lengths are left-padded into one batch; an attention hook keeps a
plain (contiguous) KV cache and masks the padding, so each new token costs one
single-position forward. Every token is drawn by the serving engine's sampler
(`server.engine.sampler.sample`): one sampling implementation for serving, evaluation
and RL, with the same per-row seeding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt.model import GPT
from server.engine.api import SamplingParams
from server.engine.sampler import SamplingTensors, sample


class PaddedKVCache:
    """The attention hook: appends each layer's keys/values and lets a query see the
    non-padding keys at or before its own slot (and always itself, so that a padding
    query never has an empty, NaN-producing row)."""

    def __init__(self, valid: torch.Tensor) -> None:
        self.valid = valid                       # (B, T) bool: real token at that slot
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None

    def extend(self, valid_new: torch.Tensor | None = None) -> None:
        """Register the slots about to be computed (none for the prompt, already in
        `valid`), then build the mask their queries use."""
        past = 0
        if valid_new is not None:
            past = self.valid.shape[1]
            self.valid = torch.cat([self.valid, valid_new], dim=1)
        total = self.valid.shape[1]
        slots_q = torch.arange(past, total, device=self.valid.device)
        slots_k = torch.arange(total, device=self.valid.device)
        causal = slots_k[None, :] <= slots_q[:, None]                         # (Tq, Tk)
        mask = (causal[None] & self.valid[:, None, :]) | (slots_k[None, :] == slots_q[:, None])[None]
        self.mask = mask[:, None]                                               # (B, 1, Tq, Tk)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


@dataclass
class Generation:
    tokens: list[list[int]]          # generated ids per row, stop token included when hit
    logprobs: list[list[float]]      # the sampler's log-prob of each generated id
    finished: list[bool]             # True when the row ended with a stop token


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
             params: SamplingParams | None = None, seeds: Sequence[int] | None = None,
             pad_id: int = 0) -> Generation:
    """Generate for every prompt until a stop id or `max_new_tokens`. `params` default to
    greedy; `seeds` (one per row) make sampled rows reproducible whatever the batch."""
    params = params or SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    device = next(model.parameters()).device
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    valid = torch.zeros((batch, width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        valid[i, width - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    # Positions count real tokens only, so a left-padded prompt sees the positions it
    # would see alone.
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cache = PaddedKVCache(valid)
    cache.extend()
    tensors = SamplingTensors.from_params([params] * batch, device)
    seed_t = torch.tensor(list(seeds), dtype=torch.int64) if seeds is not None else None
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    next_pos = positions[:, -1] + 1
    logits = model(ids, positions=positions, hook=cache)[:, -1]
    out_tokens = torch.zeros((batch, 0), dtype=torch.long, device=device)
    out_logps = torch.zeros((batch, 0), dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        steps = torch.full((batch,), step, dtype=torch.int64)
        drawn = sample(logits, tensors, seeds=seed_t, steps=steps if seed_t is not None else None)
        token = torch.where(done, torch.full_like(drawn.token_ids, pad_id), drawn.token_ids)
        out_tokens = torch.cat([out_tokens, token[:, None]], dim=1)
        out_logps = torch.cat([out_logps, drawn.logprobs[:, None].float()], dim=1)
        live = ~done
        done = done | torch.isin(token, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            lengths = _lengths(out_tokens, stop)
            break
        cache.extend(live[:, None])
        logits = model(token[:, None], positions=next_pos[:, None], hook=cache)[:, -1]
        next_pos = next_pos + 1
    else:  # max_new_tokens == 0
        lengths = torch.zeros(batch, dtype=torch.long)
    tokens = out_tokens.tolist()
    logps = out_logps.tolist()
    n = lengths.tolist()
    return Generation(tokens=[tokens[i][:n[i]] for i in range(batch)],
                      logprobs=[logps[i][:n[i]] for i in range(batch)],
                      finished=[bool(n[i]) and tokens[i][n[i] - 1] in set(stop_ids) for i in range(batch)])


def _lengths(out: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Tokens per row up to and including the first stop id (all of them if none)."""
    is_stop = torch.isin(out, stop)
    first = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, torch.full_like(out[:, 0], out.shape[1]))
    return first.cpu()
