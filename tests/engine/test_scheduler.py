"""Scheduling rules, checked step by step without a model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.scheduler import Scheduler
from server.engine.sequence import SeqStatus, Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence(request=None, index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens), seed=0)


def advance(batch) -> None:
    """What the engine does after a step: the computed tokens are in the cache and each
    sequence that reached its end samples one more token."""
    for s, n in batch:
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.token_ids.append(7)


def test_long_prompt_is_chunked_and_does_not_stall_decodes():
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(EngineConfig(max_num_seqs=8, max_num_batched_tokens=10), blocks, max_seq_len=4096)
    short = seq([1, 2, 3])
    sched.add(short)
    advance(sched.schedule().batch)                       # prefill of the short prompt
    long = seq(list(range(100, 140)))               # 40 tokens: needs 5 chunks beside a decode
    sched.add(long)
    chunks = []
    while long.num_computed < long.num_prompt_tokens:
        batch = sched.schedule().batch
        got = dict((id(s), n) for s, n in batch)
        assert got[id(short)] == 1                  # the decode runs every step
        chunks.append(got[id(long)])
        assert sum(got.values()) <= 10
        advance(batch)
    assert chunks == [9, 9, 9, 9, 4]


def test_newest_sequence_is_preempted_and_resumes_with_its_tokens():
    blocks = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(EngineConfig(max_num_seqs=8, max_num_batched_tokens=64), blocks, max_seq_len=4096)
    old, new = seq([1, 2, 3, 4, 5, 6, 7]), seq([9, 9, 9, 9, 9, 9])
    sched.add(old)
    sched.add(new)
    advance(sched.schedule().batch)                       # both prefilled: 2 + 2 blocks, pool full
    # old has 8 tokens: its 9th needs a third block -> the newest (new) is preempted.
    for _ in range(3):
        advance(sched.schedule().batch)
    assert sched.num_preemptions >= 1
    assert new.status is SeqStatus.WAITING and not new.block_table
    assert new.token_ids[:6] == [9] * 6 and new.num_computed == 0
    sched.finish(old)
    batch = sched.schedule().batch
    assert [s for s, _ in batch] == [new]
    assert batch[0][1] == new.num_tokens - new.num_computed   # recomputed, prefix cache permitting


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(0, 5)), min_size=1, max_size=60))
def test_block_pool_returns_whole_after_any_sequence_of_operations(ops):
    blocks = BlockManager(num_blocks=16, block_size=4)
    live: list[Sequence] = []
    for op, length, prefix in ops:
        if op <= 1:
            s = seq([prefix] * 4 + list(range(length)))      # shared first block across many
            if blocks.allocate(s) is not None:
                s.num_computed = s.num_tokens
                blocks.register_full_blocks(s)
                live.append(s)
        elif op == 2 and live:
            s = live[length % len(live)]
            s.token_ids.append(length)
            if blocks.ensure_capacity(s, s.num_tokens):
                s.num_computed = s.num_tokens
                blocks.register_full_blocks(s)
        elif live:
            blocks.free(live.pop(length % len(live)))
        referenced = sum(1 for r in blocks.ref_counts if r)
        assert referenced + blocks.num_free == blocks.num_blocks
        assert blocks.num_free >= 0
    for s in live:
        blocks.free(s)
    blocks.check_whole()
