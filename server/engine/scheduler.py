"""The scheduler: which sequences run in the next step, and how many tokens each.

Iteration-level batching: every step, running sequences go first (oldest first: a
decode needs one token, an unfinished prefill gets its next chunk), then waiting ones
are admitted in arrival order while the token budget, the sequence limit and the free
blocks allow. When a running sequence needs a new block and none is free, the newest
running sequence is preempted: its blocks are released (full ones stay in the prefix
cache) and it goes back to the front of the queue to be recomputed later. Sampling is
a pure function of (seed, position), so a preempted sequence's output is unchanged.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

from server.engine.block_manager import BlockManager
from server.engine.sequence import SeqStatus, Sequence


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64               # sequences in one step
    max_num_batched_tokens: int = 512    # tokens in one step (the prefill chunk bound)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SeqStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.ensure_capacity(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            batch.append((seq, n))
            budget -= n
            i += 1
        # While memory is short, admitting more would only cause more preemptions.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.blocks.allocate(seq) is None:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        self.add(seq, front=True)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and release its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            # A held choice (n > 1) may never have entered the queue.
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
