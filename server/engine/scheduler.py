"""The scheduler: which sequences run in the next step, how many tokens each, and which
of them a sampled token finishes.

Iteration-level batching: every step, running sequences go first (oldest first: a
decode needs one token, an unfinished prefill gets its next chunk), then waiting ones
are admitted in arrival order while the token budget, the sequence limit and the free
blocks allow. When a running sequence needs a new block and none is free, the newest
running sequence is preempted: its blocks are released (full ones stay in the prefix
cache) and it goes back to the front of the queue to be recomputed later. Sampling is
a pure function of (seed, position), so a preempted sequence's output is unchanged.

Finishes decided here are the ones the token ids alone settle: a stop token (eos unless
ignored, or one of stop_token_ids), a grammar that must end (structured outputs) and the
length limits. Stop strings need text; the output processor finds them and aborts the
choice.

Backpressure: a sequence whose reader lags is paused: it leaves the running set and is
not scheduled, keeping its blocks for `pause_grace_s`; after that (or at once when
memory is short: paused sequences are the first to give blocks up) its blocks are freed
and it recomputes on resume, as after a preemption.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque

from server.engine.api import FinishReason
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_seq_len: int) -> None:
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_seq_len = max_seq_len
        self.pause_grace_s = config.pause_grace_s
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.paused: list[Sequence] = []        # oldest pause first
        self.admitted: list[Sequence] = []      # taken from the queue by the last schedule()
        self.decode_only = False                # the last batch: one token each, context cached
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
        now = time.monotonic()
        for seq in self.paused:
            if seq.block_table and now - seq.paused_at >= self.pause_grace_s:
                self._release_paused(seq)
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        self.admitted = []
        preempted = False
        i = 0
        block_size = self.blocks.block_size
        decode_only = True
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            decode_only = decode_only and n == 1 and seq.num_computed > 0
            # (Most steps a decode's token fits its last block: no call for it.)
            while (seq.num_computed + n > len(seq.block_table) * block_size
                   and not self.blocks.ensure_capacity(seq, seq.num_computed + n)):
                holder = next((p for p in self.paused if p.block_table), None)
                if holder is not None:
                    self._release_paused(holder)
                    continue
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
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.blocks.allocate(seq) is None:
                holder = next((p for p in self.paused if p.block_table), None)
                if holder is None:
                    break
                self._release_paused(holder)
                continue
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.admitted.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        self.decode_only = decode_only and not self.admitted
        return batch

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[FinishReason | None]:
        """Append each sequence's sampled token and finish the sequences it ends; returns
        each one's finish reason (None = goes on)."""
        reasons: list[FinishReason | None] = []
        max_seq_len = self.max_seq_len
        # (Locals rather than the Sequence properties: this runs for every row of every step.)
        for seq, token in zip(seqs, token_ids, strict=True):
            tokens = seq.token_ids
            first = len(tokens) == seq.num_prompt_tokens
            tokens.append(token)
            state = seq.request
            grammar = seq.grammar
            reason: FinishReason | None = None
            if grammar is not None and grammar.failure is not None:
                # Its mask ran past the grammar limits: this choice ends with the error.
                state.error = state.error or grammar.failure
                reason = "abort"
            elif token in state.stop_ids:
                reason = "stop"
            elif grammar is not None and not grammar.accept(token):
                # The mask allows only what the grammar accepts, so this is a bug, not a
                # user error: end the choice rather than emit output that breaks the format.
                log.error("grammar refused sampled token %d: %s", token, grammar.error)
                reason = "abort"
            elif grammar is not None and grammar.is_stopped():
                reason = "stop"              # complete, and nothing may follow
            elif (len(tokens) - seq.num_prompt_tokens >= state.request.params.max_tokens
                  or len(tokens) >= max_seq_len):
                reason = "length"
            if reason is not None:
                seq.finish_reason = reason
                self.finish(seq)
            if first and seq.index == 0 and state.held_choices:
                # The prompt's blocks are now computed and cached: the other choices start
                # from them instead of computing the prompt again.
                for held in reversed(state.held_choices):
                    self.add(held, front=True)
                state.held_choices = []
            reasons.append(reason)
        return reasons

    def pause(self, seq: Sequence) -> None:
        """Stop scheduling `seq` until `resume` (its reader lags)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        else:
            return
        seq.status = SeqStatus.PAUSED
        seq.paused_at = time.monotonic()
        self.paused.append(seq)

    def resume(self, seq: Sequence) -> None:
        if seq.status is not SeqStatus.PAUSED:
            return
        self.paused.remove(seq)
        if seq.block_table and len(self.running) < self.max_num_seqs:
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        else:
            if seq.block_table:
                self.blocks.free(seq)
            self.add(seq, front=True)

    def _release_paused(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self.num_preemptions += 1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        self.add(seq, front=True)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and release its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.PAUSED:
            self.paused.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            # A held choice (n > 1) may never have entered the queue.
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
