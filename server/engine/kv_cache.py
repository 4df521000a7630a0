"""The paged KV cache: a preallocated pool of blocks per layer and the attention hook
that reads and writes it.

One engine step packs the new tokens of every scheduled sequence into a single row of
the model's input (no padding through the projections and MLP). In each layer the hook
writes the new keys/values into their slots, then, per group of sequences (decodes
together, prefill chunks together), gathers each sequence's blocks into a padded
(rows, kv_heads, length, head_dim) tensor and runs scaled-dot-product attention with a
mask: causal inside the chunk, everything cached before it, nothing past the sequence's
own length. The same code runs on CPU and CUDA.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gpt.config import ModelConfig
from server.engine.blocks import blocks_for
from server.engine.paged_attention import paged_attention, write_kv


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return config.kv_bytes_per_token(elem) * block_size


# With the paged kernel, a prompt computed from its first token goes to the kernel up to
# this many tokens, to its own causal SDPA call beyond. `small` bf16 step, best of 15,
# kernel vs SDPA per prompt: 16 prompts x 32 tokens 21.9 vs 27.5 ms, 8 x 48 + 32 decodes
# 27.7 vs 33.8, 4 x 128 + 32 decodes 36.6 vs 37.2, 2 x 256 37.3 vs 32.9 (fp32 alike).
KERNEL_PROMPT_MAX = 128


@dataclass
class RowSpec:
    """One sequence in a step: `q_len` new tokens at positions start..start+q_len-1."""

    start: int
    q_len: int
    block_table: list[int]


@dataclass
class AttentionGroup:
    token_index: torch.Tensor          # (R, Q) index of each row's queries in the packed step
    block_tables: torch.Tensor         # (R * MB,) blocks to gather, row by row
    kv_len: int                        # keys gathered per row (<= MB * block_size)
    mask: torch.Tensor | None          # (R, 1, Q, kv_len) additive bias (0 / -inf); None = no mask
    dst: torch.Tensor                  # packed positions the valid outputs go to
    src: torch.Tensor | None           # their rows in the flattened (R*Q) output; None = all
    fresh: tuple[int, int] | None = None   # one row computed from position 0: its packed
                                           # token range; attends to its own new keys


@dataclass
class PagedTokens:
    """The tokens the in-place kernel computes (every token of a row with cached context)."""

    tokens: torch.Tensor               # (N,) their indices in the packed step
    row_of_token: torch.Tensor         # (T,) each packed token's row
    block_tables: torch.Tensor         # (R, MB) each row's block table, padded with block 0


@dataclass
class AttentionPlan:
    slot_mapping: torch.Tensor         # (T,) cache slot of each new token
    positions: torch.Tensor            # (T,) position of each new token in its sequence
    groups: list[AttentionGroup]
    paged: PagedTokens | None = None   # with the kernel: the tokens it computes (groups
                                       # then hold only the fresh prompts)


def plan_attention(rows: list[RowSpec], block_size: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, in_place: bool = False,
                   kernel_prompt_max: int = KERNEL_PROMPT_MAX) -> AttentionPlan:
    """Index tensors for one step, built once and shared by every layer. `in_place`: the
    rows with cached context go to the paged kernel instead of gathered groups.

    The per-token indices are computed in numpy and handed to torch without a copy: as
    some forty small torch ops they took ~0.4 ms of a 64-sequence decode step (dispatch,
    not arithmetic); numpy does each in one C loop."""
    num_rows = len(rows)
    q_lens = np.fromiter((r.q_len for r in rows), dtype=np.int64, count=num_rows)
    starts = np.fromiter((r.start for r in rows), dtype=np.int64, count=num_rows)
    table_lens = np.fromiter((len(r.block_table) for r in rows), dtype=np.int64, count=num_rows)
    offsets = np.cumsum(q_lens) - q_lens
    max_blocks = int(table_lens.max())
    tables = np.zeros((num_rows, max_blocks), dtype=np.int64)
    tables[np.arange(max_blocks)[None, :] < table_lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(r.block_table for r in rows), dtype=np.int64, count=int(table_lens.sum()))
    num_tokens = int(q_lens.sum())
    row_of_token = np.repeat(np.arange(num_rows), q_lens)
    pos = starts[row_of_token] + np.arange(num_tokens) - offsets[row_of_token]
    slots = tables[row_of_token, pos // block_size] * block_size + pos % block_size

    # A prompt computed from its first token attends only to its own new keys: it gets a
    # causal kernel of its own, with no gather and no padding to its batch mates' lengths.
    # With the paged kernel, only long ones do: a short prompt is cheaper in the kernel's
    # pass over the step's tokens than in an SDPA call (and its index tensors) of its own.
    is_decode = q_lens == 1
    fresh = ~is_decode & (starts == 0)
    paged = None
    tables_t = torch.from_numpy(tables)
    if in_place:
        fresh &= q_lens > kernel_prompt_max
        members_list = []
        if not fresh.all():
            paged = PagedTokens(tokens=torch.from_numpy(np.flatnonzero(~fresh[row_of_token])),
                                row_of_token=torch.from_numpy(row_of_token), block_tables=tables_t)
    else:
        members_list = [np.flatnonzero(is_decode), np.flatnonzero(~is_decode & ~fresh)]
    members_list += [np.array([i]) for i in np.flatnonzero(fresh)]
    q_lens_t, starts_t, offsets_t = (torch.from_numpy(a) for a in (q_lens, starts, offsets))
    groups = [_group(torch.from_numpy(members), q_lens_t, starts_t, offsets_t, tables_t, block_size, device, dtype)
              for members in members_list if len(members)]
    return AttentionPlan(slot_mapping=torch.from_numpy(slots).to(device), positions=torch.from_numpy(pos).to(device),
                         groups=groups, paged=paged)


def _group(members: torch.Tensor, q_lens: torch.Tensor, starts: torch.Tensor, offsets: torch.Tensor,
           tables: torch.Tensor, block_size: int, device: torch.device, dtype: torch.dtype) -> AttentionGroup:
    ql, st, off = q_lens[members], starts[members], offsets[members]
    ctx = st + ql
    q_max, kv_len = int(ql.max()), int(ctx.max())
    n_blocks = blocks_for(kv_len, block_size)
    qi = torch.arange(q_max)
    valid_q = qi[None, :] < ql[:, None]                                   # (R, Q)
    # Padded query slots repeat the row's last real token; their output is dropped.
    token_index = off[:, None] + torch.minimum(qi[None, :], ql[:, None] - 1)
    fresh = (int(off[0]), int(off[0] + ql[0])) if len(members) == 1 and int(st[0]) == 0 and q_max > 1 else None
    mask = None
    if fresh is None:
        kj = torch.arange(kv_len)
        mask = (kj[None, None, :] <= (st[:, None, None] + qi[None, :, None])) & (kj[None, None, :] < ctx[:, None, None])
        if bool(mask.all()):
            mask = None
    all_valid = bool(valid_q.all())
    return AttentionGroup(
        token_index=token_index.to(device),
        block_tables=tables[members, :n_blocks].reshape(-1).to(device),
        kv_len=kv_len,
        # An additive bias: the CPU kernel takes it faster than a boolean mask.
        mask=torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))[:, None].to(device)
        if mask is not None else None,
        dst=token_index[valid_q].to(device),
        src=None if all_valid else torch.nonzero(valid_q.flatten()).flatten().to(device),
        fresh=fresh,
    )


class PagedKVCache:
    """Key and value pools, one block = (kv_heads, block_size x head_dim) per layer, with
    each KV head's slice contiguous. Keys are stored transposed inside a block, (head_dim,
    block_size), values as (block_size, head_dim): the in-place kernel then scores a whole
    block with full-width vector multiply-adds over positions and sums values row by row.
    Calling the cache with a plan returns the model's AttentionHook for that step."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 in_place: bool = False) -> None:
        self.config = config
        self.in_place = in_place           # attention by the paged kernel (see plan_attention)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (2, config.n_layers, num_blocks, config.n_kv_heads, block_size * config.head_dim)
        self.pool = torch.zeros(shape, dtype=dtype, device=self.device)

    def layer_pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's pools: keys (blocks, KVH, D, BS), values (blocks, KVH, BS, D)."""
        nb, kvh, bs, hd = self.num_blocks, self.config.n_kv_heads, self.block_size, self.config.head_dim
        return self.pool[0, layer].view(nb, kvh, hd, bs), self.pool[1, layer].view(nb, kvh, bs, hd)

    def hook(self, plan: AttentionPlan):
        kvh, hd = self.config.n_kv_heads, self.config.head_dim
        slot = None if self.in_place else (plan.slot_mapping // self.block_size, plan.slot_mapping % self.block_size)

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q: (1, H, T, D) packed over the step's sequences; k, v: (1, KVH, T, D).
            kc, vc = self.layer_pools(layer)
            if self.in_place:
                write_kv(kc, vc, k[0], v[0], plan.slot_mapping)
            else:
                # Both written through views indexed (block, position, kv head, dim).
                kc.permute(0, 3, 1, 2).index_put_(slot, k[0].transpose(0, 1))
                vc.permute(0, 2, 1, 3).index_put_(slot, v[0].transpose(0, 1))
            qt = q[0].transpose(0, 1)                                              # (T, H, D)
            n_heads = qt.shape[1]
            out = torch.empty_like(qt, memory_format=torch.contiguous_format)
            if plan.paged is not None:
                p = plan.paged
                paged_attention(out, qt.contiguous(), kc, vc, p.tokens, p.row_of_token, plan.positions,
                                p.block_tables, q.shape[-1] ** -0.5)
            for g in plan.groups:
                rows, q_max = g.token_index.shape
                if g.fresh is not None:
                    lo, hi = g.fresh
                    o = F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi],
                                                       is_causal=True, enable_gqa=True)
                else:
                    qg = qt[g.token_index].permute(0, 2, 1, 3)                     # (R, H, Q, D)
                    # index_select is about twice as fast as advanced indexing here; the
                    # copies come out (R, KVH, blocks x BS, D) for SDPA.
                    kg = (kc.index_select(0, g.block_tables).view(rows, -1, kvh, hd, self.block_size)
                          .permute(0, 2, 1, 4, 3).reshape(rows, kvh, -1, hd)[:, :, :g.kv_len])
                    vg = (vc.index_select(0, g.block_tables).view(rows, -1, kvh, self.block_size, hd)
                          .permute(0, 2, 1, 3, 4).reshape(rows, kvh, -1, hd)[:, :, :g.kv_len])
                    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, enable_gqa=True)
                o = o.permute(0, 2, 1, 3).reshape(rows * q_max, n_heads, -1)
                out.index_copy_(0, g.dst, o if g.src is None else o[g.src])
            return out.transpose(0, 1)[None]

        return attention
