"""The kept decode plan equals a plan built from scratch, step after step: through blocks
appended, the batch changing, a sequence freed and allocated again, and the kept array
growing wider."""

from __future__ import annotations

import numpy as np
import torch

from server.engine.api import EngineRequest, RequestTimings, SamplingParams
from server.engine.block_manager import BlockManager
from server.engine.decode_plan import TABLE_WIDTH_STEP, DecodePlanner
from server.engine.kv_cache import AttentionPlan, RowSpec, plan_attention
from server.engine.sequence import RequestState, Sequence

BS = 4


def _seq(prompt_len: int) -> Sequence:
    request = EngineRequest(request_id="r", prompt_ids=[1] * prompt_len, params=SamplingParams(max_tokens=64))
    state = RequestState(request=request, timings=RequestTimings(arrival=0.0), stop_ids=frozenset())
    return Sequence(request=state, index=0, token_ids=[1] * prompt_len, num_prompt_tokens=prompt_len, seed=0)


def _prefilled(blocks: BlockManager, prompt_len: int) -> Sequence:
    seq = _seq(prompt_len)
    assert blocks.allocate(seq) is not None
    seq.num_computed = prompt_len
    seq.token_ids.append(2)          # the sampled token, whose keys the next step computes
    return seq


def _advance(blocks: BlockManager, seqs: list[Sequence]) -> None:
    """What a decode step does to each sequence: room for the new token, computed, sampled."""
    for seq in seqs:
        assert blocks.ensure_capacity(seq, seq.num_computed + 1)
    # (the step runs here)


def _after_step(seqs: list[Sequence]) -> None:
    for seq in seqs:
        seq.num_computed += 1
        seq.token_ids.append(3)


def _assert_same(kept: AttentionPlan, seqs: list[Sequence]) -> None:
    fresh = plan_attention([RowSpec(s.num_computed, 1, s.block_table) for s in seqs], BS, torch.device("cpu"),
                           in_place=True)
    assert torch.equal(kept.slot_mapping, fresh.slot_mapping)
    assert torch.equal(kept.positions, fresh.positions)
    assert not kept.groups and not fresh.groups
    assert kept.paged is not None and fresh.paged is not None
    assert torch.equal(kept.paged.tokens, fresh.paged.tokens)
    assert torch.equal(kept.paged.row_of_token, fresh.paged.row_of_token)
    # The kept table may be wider: padding past a row's blocks is never read.
    width = fresh.paged.block_tables.shape[1]
    assert kept.paged.block_tables.shape[1] >= width
    assert kept.paged.block_tables.shape[1] % TABLE_WIDTH_STEP == 0
    for row, seq in enumerate(seqs):
        assert kept.paged.block_tables[row, :len(seq.block_table)].tolist() == seq.block_table


def test_kept_plan_equals_a_fresh_one_through_growth_and_batch_changes():
    blocks = BlockManager(num_blocks=256, block_size=BS)
    planner = DecodePlanner(BS)
    seqs = [_prefilled(blocks, n) for n in (3, 4, 9, 1)]
    plans = []
    for step in range(40):
        if step == 10:
            blocks.free(seqs[1])                   # a finish: the batch shrinks
            seqs = [seqs[0], seqs[2], seqs[3]]
        if step == 15:
            seqs.append(_prefilled(blocks, 6))     # a newcomer after its prefill
        if step == 20:
            # Preempted and recomputed: same object, a new block table, position moved back.
            victim = seqs[0]
            blocks.free(victim)
            blocks.allocate(victim)
            victim.num_computed = victim.num_tokens - 1
        _advance(blocks, seqs)
        plan = planner.plan(seqs)
        _assert_same(plan, seqs)
        plans.append(plan)
        _after_step(seqs)
    # 40 steps from 9 tokens at block size 4 outgrow the first kept width of 8 blocks.
    assert max(len(s.block_table) for s in seqs) > TABLE_WIDTH_STEP


def test_kept_plan_reuses_its_state_for_the_same_batch():
    blocks = BlockManager(num_blocks=64, block_size=BS)
    planner = DecodePlanner(BS)
    seqs = [_prefilled(blocks, n) for n in (5, 7)]
    _advance(blocks, seqs)
    first = planner.plan(seqs)
    _after_step(seqs)
    _advance(blocks, seqs)
    second = planner.plan(seqs)
    # The same kept table (updated in place), not a rebuilt one.
    assert second.paged.block_tables.data_ptr() == first.paged.block_tables.data_ptr()
    assert np.array_equal(second.positions.numpy(), first.positions.numpy() + 1)
