"""Attention through the paged cache equals full recomputation, logit for logit."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine import paged_attention
from server.engine.block_manager import BlockManager
from server.engine.blocks import blocks_for
from server.engine.kv_cache import PagedKVCache, RowSpec, plan_attention


class _Seq:
    """The little a step needs of a sequence: tokens, progress and a block table."""

    def __init__(self, tokens: list[int], blocks: list[int]) -> None:
        self.tokens = tokens
        self.done = 0
        self.blocks = blocks


NEEDS_KERNEL = pytest.mark.skipif(not paged_attention.available(), reason="needs a C++ compiler and ninja to build the paged attention kernel")
# (in_place, kernel_prompt_max): the kernel computing fresh prompts too, or leaving every
# fresh prompt to its own SDPA call; the gather path.
PATHS = [pytest.param(True, 128, id="in-place", marks=NEEDS_KERNEL),
         pytest.param(True, 0, id="in-place-sdpa-prompts", marks=NEEDS_KERNEL),
         pytest.param(False, 128, id="gather")]


@pytest.mark.parametrize(("in_place", "kernel_prompt_max"), PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [4, 16])     # 16 with this head size: the kernel's compiled shape
@torch.inference_mode()
def test_paged_attention_matches_full_forward(model, prompts, in_place, kernel_prompt_max, dtype, bs):
    model = model.to(dtype)
    lengths = [len(p) for p in prompts]
    seqs = []
    rng = random.Random(0)
    # Scatter the blocks over the pool so no sequence's blocks are contiguous.
    pool_blocks = list(range(sum(blocks_for(n, bs) for n in lengths) + 8))
    rng.shuffle(pool_blocks)
    for p in prompts:
        need = blocks_for(len(p), bs)
        seqs.append(_Seq(p, [pool_blocks.pop() for _ in range(need)]))
    cache = PagedKVCache(model.config, num_blocks=len(pool_blocks) + sum(len(s.blocks) for s in seqs),
                         block_size=bs, dtype=dtype, in_place=in_place)
    full = [model(torch.tensor([s.tokens]))[0] for s in seqs]
    got: list[list[torch.Tensor | None]] = [[None] * len(s.tokens) for s in seqs]
    # Mixed steps: each sequence advances by a random chunk (1 = a decode step) until done.
    while any(s.done < len(s.tokens) for s in seqs):
        active = [s for s in seqs if s.done < len(s.tokens) and rng.random() < 0.8]
        if not active:
            continue
        rows, ids, owners = [], [], []
        for s in active:
            n = min(rng.choice([1, 1, 2, 3, 5, 9]), len(s.tokens) - s.done)
            rows.append(RowSpec(start=s.done, q_len=n, block_table=s.blocks))
            ids += s.tokens[s.done:s.done + n]
            owners += [(seqs.index(s), s.done + j) for j in range(n)]
            s.done += n
        plan = plan_attention(rows, bs, torch.device("cpu"), dtype, in_place, kernel_prompt_max)
        logits = model(torch.tensor([ids]), plan.positions[None], cache.hook(plan))[0]
        for t, (si, pos) in enumerate(owners):
            got[si][pos] = logits[t]
    # fp32: the standard's 1e-4. bf16 rounds differently per path (8-bit mantissa): the
    # logits must still agree to within a few of its steps at their scale.
    atol = 1e-4 if dtype == torch.float32 else 0.1
    for si in range(len(seqs)):
        paged = torch.stack(got[si]).float()
        want = full[si].float()
        assert torch.allclose(paged, want, atol=atol, rtol=0), (si, (paged - want).abs().max())


def test_block_manager_prefix_reuse_and_eviction():
    from server.engine.engine import Engine  # noqa: F401  (import check: the engine wires these)
    from server.engine.sequence import Sequence

    class _Req:
        pass

    def seq(tokens):
        return Sequence(request=_Req(), index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                        seed=0)

    bm = BlockManager(num_blocks=5, block_size=4)
    a = seq(range(10))                       # blocks: [0..3] [4..7] [8, 9]
    assert bm.allocate(a) == 0 and len(a.block_table) == 3
    a.num_computed = 10
    bm.register_full_blocks(a)
    b = seq([*range(8), 99])                 # shares two full blocks
    assert bm.allocate(b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    c = seq([0, 1, 2, 3, 7, 7, 7, 7, 5])     # shares only the first block
    assert bm.allocate(c) is None            # 1 free block, needs 2 new ones: refused, nothing changed
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free(a)
    bm.free(b)
    # Freed cached blocks wait for revival; a same-prefix prompt revives them.
    d = seq([*range(8), 42, 43])
    assert bm.allocate(d) == 8
    bm.free(d)
    bm.check_whole()
    # A different prompt that needs the whole pool evicts them.
    e = seq(range(100, 120))
    assert bm.allocate(e) == 0
    assert not bm.cached
    bm.free(e)
    bm.check_whole()


def test_prefix_hit_verifies_tokens_not_only_hashes(monkeypatch):
    import server.engine.block_manager as bm_mod
    from server.engine.sequence import Sequence

    monkeypatch.setattr(bm_mod, "block_hash", lambda parent, tokens: 7)   # every block collides
    bm = BlockManager(num_blocks=8, block_size=2)
    a = Sequence(request=None, index=0, token_ids=[1, 2, 3], num_prompt_tokens=3, seed=0)
    bm.allocate(a)
    a.num_computed = 3
    bm.register_full_blocks(a)
    b = Sequence(request=None, index=0, token_ids=[5, 6, 3], num_prompt_tokens=3, seed=0)
    assert bm.allocate(b) == 0


@NEEDS_KERNEL
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])     # 32/64/128 at block 16: compiled shapes
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_attention_over_gathered_keys(head_dim, bs, dtype):
    """Every shape the kernel dispatches on, against SDPA over each token's own keys."""
    gen = torch.Generator().manual_seed(head_dim * 100 + bs)
    n_heads, kv_heads, lengths = 6, 2, [1, 5, 16, 17, 40, 63]
    max_blocks = blocks_for(max(lengths), bs)
    num_blocks = len(lengths) * max_blocks + 3
    k_pool = torch.randn(num_blocks, kv_heads, head_dim, bs, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, kv_heads, bs, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[:len(lengths) * max_blocks].view(len(lengths), -1)
    # One query per position of every sequence (a prefill chunk's tokens and decodes alike).
    row_of_token = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    q = torch.randn(len(positions), n_heads, head_dim, generator=gen).to(dtype)
    out = torch.zeros_like(q)
    tokens = torch.arange(len(positions))[::2].contiguous()      # every other token; the rest stay 0
    paged_attention.paged_attention(out, q, k_pool, v_pool, tokens, row_of_token, positions, tables,
                                    head_dim ** -0.5)
    for t in range(len(positions)):
        if t % 2:
            assert not out[t].any()
            continue
        blocks = tables[row_of_token[t]]
        n = int(positions[t]) + 1
        keys = k_pool[blocks].permute(1, 0, 3, 2).reshape(kv_heads, -1, head_dim)[:, :n].float()
        values = v_pool[blocks].permute(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)[:, :n].float()
        want = torch.nn.functional.scaled_dot_product_attention(
            q[t].float()[:, None], keys.repeat_interleave(3, 0), values.repeat_interleave(3, 0))[:, 0]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(out[t].float(), want, atol=tol, rtol=tol), (t, (out[t].float() - want).abs().max())


@NEEDS_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_equals_writing_through_views(dtype):
    """The kernel's store of a step's keys and values lands where the portable path's
    index_put_ through permuted views puts them, from strided inputs, and nowhere else."""
    gen = torch.Generator().manual_seed(7)
    blocks, kv_heads, head_dim, bs, tokens = 9, 2, 32, 4, 11
    k_pool = torch.randn(blocks, kv_heads, head_dim, bs, generator=gen).to(dtype)
    v_pool = torch.randn(blocks, kv_heads, bs, head_dim, generator=gen).to(dtype)
    # Strided like the model's: (1, kv_heads, tokens, head_dim) views of wider tensors.
    k = torch.randn(1, tokens, 3 * kv_heads, head_dim, generator=gen).to(dtype)[:, :, kv_heads:2 * kv_heads]
    v = torch.randn(1, tokens, kv_heads, head_dim, generator=gen).to(dtype)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    slots = torch.randperm(blocks * bs, generator=gen)[:tokens]
    want_k, want_v = k_pool.clone(), v_pool.clone()
    at = (slots // bs, slots % bs)
    want_k.permute(0, 3, 1, 2).index_put_(at, k[0].transpose(0, 1))
    want_v.permute(0, 2, 1, 3).index_put_(at, v[0].transpose(0, 1))
    paged_attention.write_kv(k_pool, v_pool, k[0], v[0], slots)
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_attention.write_kv(k_pool, v_pool, k[0], v[0], slots + blocks * bs)


def test_prefix_blocks_are_shared_only_under_the_same_cache_salt():
    # A sequence's cache salt (its LoRA adapter version) roots its hash chain: the same
    # prompt under another adapter, another version of it, or the base model misses.
    from server.engine.sequence import Sequence

    class _Req:
        pass

    def seq(salt):
        return Sequence(request=_Req(), index=0, token_ids=list(range(9)), num_prompt_tokens=9, seed=0,
                        cache_salt=salt)

    bm = BlockManager(num_blocks=32, block_size=4)
    first = seq(hash(("lora", "a", 1)))
    assert bm.allocate(first) == 0
    first.num_computed = 9
    bm.register_full_blocks(first)
    assert bm.allocate(seq(hash(("lora", "a", 1)))) == 8          # same adapter version: a hit
    assert bm.allocate(seq(hash(("lora", "a", 2)))) == 0          # its next version: a miss
    assert bm.allocate(seq(hash(("lora", "b", 1)))) == 0          # another adapter: a miss
    assert bm.allocate(seq(None)) == 0                            # the base model: a miss
