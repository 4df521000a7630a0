"""Attention plans for consecutive decode steps, kept and updated instead of rebuilt.

A decode batch is usually the last step's batch again, each sequence one token further
on: its block table differs at most by a block appended at the end. `plan_attention`
rebuilds every index from the sequences' block tables each step (~0.3 ms of a
64-sequence step measured inside the engine, as much as a layer's attention, since the
step's forward leaves the caches cold for the Python that follows). This planner keeps
the padded block-table array of the last step, checks that the batch is the same
sequences with the same block tables, copies only the rows that grew a block, and derives the new
positions and cache slots from it.

It makes plans for the in-place kernel only (every row a single token with cached context:
no gathered groups); other batches go to `plan_attention`, and the next decode step starts
a new kept state.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from server.engine.blocks import blocks_for
from server.engine.kv_cache import AttentionPlan, PagedTokens
from server.engine.sequence import Sequence

_block_table = operator.attrgetter("block_table")
_num_computed = operator.attrgetter("num_computed")

# Kept tables are padded to a multiple of this many blocks, so that a row growing a block
# seldom means a wider array. (The kernel sizes its scratch by the width: a few blocks of
# padding cost nothing measurable.)
TABLE_WIDTH_STEP = 8


class DecodePlanner:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._seqs: list[Sequence] = []
        self._tables_of: list[list[int]] = []     # each row's block_table list object
        self._lengths = np.zeros(0, dtype=np.int64)
        self._tables = np.zeros((0, 0), dtype=np.int64)
        self._tables_t = torch.from_numpy(self._tables)
        self._rows_t = torch.zeros(0, dtype=torch.int64)

    def plan(self, seqs: list[Sequence]) -> AttentionPlan:
        """The plan for one new token per sequence, at position `seq.num_computed` (each
        sequence's context is already cached)."""
        # (map and attrgetter walk the rows in C: this runs every decode step.)
        tables = list(map(_block_table, seqs))
        positions = np.fromiter(map(_num_computed, seqs), dtype=np.int64, count=len(seqs))
        lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(seqs))
        if not self._continues(seqs, tables):
            self._start(seqs, tables, lengths)
        else:
            self._grow(seqs, lengths)
        bs = self.block_size
        rows = self._rows_t.numpy()
        slots = self._tables[rows, positions // bs] * bs + positions % bs
        return AttentionPlan(
            slot_mapping=torch.from_numpy(slots), positions=torch.from_numpy(positions), groups=[],
            paged=PagedTokens(tokens=self._rows_t, row_of_token=self._rows_t, block_tables=self._tables_t))

    def _continues(self, seqs: list[Sequence], tables: list[list[int]]) -> bool:
        """The same sequences as the last plan, in the same order, each still holding the
        block table list it had: the block manager only appends to a held table (a freed
        sequence gets a new list), so the kept rows are right but for appended blocks."""
        return (len(seqs) == len(self._seqs) and all(map(operator.is_, seqs, self._seqs))
                and all(map(operator.is_, tables, self._tables_of)))

    def _start(self, seqs: list[Sequence], tables: list[list[int]], lengths: np.ndarray) -> None:
        padded = np.zeros((len(seqs), _padded(int(lengths.max()))), dtype=np.int64)
        for row, table in enumerate(tables):
            padded[row, :len(table)] = table
        self._set_tables(padded)
        self._seqs = list(seqs)
        self._tables_of = tables
        self._lengths = lengths
        self._rows_t = torch.arange(len(seqs), dtype=torch.int64)

    def _grow(self, seqs: list[Sequence], lengths: np.ndarray) -> None:
        grown = np.flatnonzero(lengths != self._lengths)
        if not len(grown):
            return
        width = self._tables.shape[1]
        if int(lengths.max()) > width:
            wider = np.zeros((len(seqs), _padded(int(lengths.max()))), dtype=np.int64)
            wider[:, :width] = self._tables
            self._set_tables(wider)
        for row in grown.tolist():
            table = seqs[row].block_table
            self._tables[row, :len(table)] = table
        self._lengths = lengths

    def _set_tables(self, tables: np.ndarray) -> None:
        self._tables = tables
        # A view: rows copied into the array later are what the kernel reads.
        self._tables_t = torch.from_numpy(tables)


def _padded(blocks: int) -> int:
    return blocks_for(blocks, TABLE_WIDTH_STEP) * TABLE_WIDTH_STEP
