"""Attention through the paged cache equals full recomputation, logit for logit."""

from __future__ import annotations

import random

import torch

from server.engine.block_manager import BlockManager
from server.engine.kv_cache import PagedKVCache, RowSpec, plan_attention


class _Seq:
    """The little a step needs of a sequence: tokens, progress and a block table."""

    def __init__(self, tokens: list[int], blocks: list[int]) -> None:
        self.tokens = tokens
        self.done = 0
        self.blocks = blocks


@torch.inference_mode()
def test_paged_attention_matches_full_forward(model, prompts):
    bs = 4
    lengths = [len(p) for p in prompts]
    seqs = []
    rng = random.Random(0)
    # Scatter the blocks over the pool so no sequence's blocks are contiguous.
    pool_blocks = list(range(sum(-(-n // bs) for n in lengths) + 8))
    rng.shuffle(pool_blocks)
    for p in prompts:
        need = -(-len(p) // bs)
        seqs.append(_Seq(p, [pool_blocks.pop() for _ in range(need)]))
    cache = PagedKVCache(model.config, num_blocks=len(pool_blocks) + sum(len(s.blocks) for s in seqs),
                         block_size=bs)
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
        plan = plan_attention(rows, bs, torch.device("cpu"))
        logits = model(torch.tensor([ids]), plan.positions[None], cache.hook(plan))[0]
        for t, (si, pos) in enumerate(owners):
            got[si][pos] = logits[t]
    for si in range(len(seqs)):
        paged = torch.stack(got[si])
        assert torch.allclose(paged, full[si], atol=1e-4, rtol=0), (si, (paged - full[si]).abs().max())


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
