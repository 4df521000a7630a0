"""The scheduler: which sequences run in the next step, how many tokens each, and which
of them a sampled token finishes.

Iteration-level batching: every step, running sequences go first (oldest first: a
decode needs one token, an unfinished prefill gets its next chunk), then waiting ones
are admitted in the policy's order while the token budget, the sequence limit and the
free blocks allow. When a running sequence needs a new block and none is free, the
policy's victim is preempted: its blocks are released (full ones stay in the prefix
cache) and it goes back to the front of its queue to be recomputed later. Sampling is
a pure function of (seed, position), so a preempted sequence's output is unchanged.

The policy (server/engine/policy.py) owns the waiting queue and the choice of victims:
FCFS (arrival order, the newest running sequence gives way) or fair share
(server/engine/fair_policy.py). A step's decisions come back as one StepPlan.

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

import logging
import time
from dataclasses import dataclass, field

from server.engine.adapter_slots import AdapterSlots
from server.engine.api import FinishReason
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.policy import SchedulingPolicy, make_policy
from server.engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepPlan:
    """One step's decisions: what runs and what changed to make it so."""

    batch: list[tuple[Sequence, int]]                           # (sequence, tokens to compute)
    admitted: list[Sequence] = field(default_factory=list)      # taken from the queue
    preempted: list[Sequence] = field(default_factory=list)     # sent back to it
    decode_only: bool = False    # one token each, context cached (the kept decode plan serves)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_seq_len: int,
                 policy: SchedulingPolicy | None = None) -> None:
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_seq_len = max_seq_len
        self.pause_grace_s = config.pause_grace_s
        self.blocks = blocks
        self.policy = self.waiting = policy or make_policy(config)    # the waiting queue
        self.running: list[Sequence] = []
        self.paused: list[Sequence] = []        # oldest pause first
        self.num_preemptions = 0
        # The engine's LoRA slots, made on the first adapter request. A sequence on an
        # adapter pins a slot from admission for as long as it holds KV blocks.
        self.adapters: AdapterSlots | None = None
        # The adapter of each queued sequence on one, by sequence (for metrics: the
        # policy's queue is not iterable; a held choice can be WAITING without being queued).
        self._queued_adapters: dict[int, str] = {}

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SeqStatus.WAITING
        self.policy.add(seq, front)
        self._count_waiting(seq, 1)

    def _count_waiting(self, seq: Sequence, n: int) -> None:
        adapter = seq.request.request.adapter if seq.request is not None else None   # (bare test sequences)
        if n > 0 and adapter is not None:
            self._queued_adapters[id(seq)] = adapter.name
        elif n < 0:
            self._queued_adapters.pop(id(seq), None)

    def waiting_adapters(self) -> list[str]:
        """Names of the adapters queued sequences are on (any thread: a copy taken at once)."""
        return sorted(set(self._queued_adapters.copy().values()))

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> StepPlan:
        now = time.monotonic()
        for seq in self.paused:
            if seq.block_table and now - seq.paused_at >= self.pause_grace_s:
                self._release_paused(seq)
        policy = self.policy
        budget = self.max_num_batched_tokens
        plan = StepPlan([])
        batch = plan.batch
        admitted = plan.admitted
        running = self.running
        if policy.preempts_to_admit and len(running) >= self.max_num_seqs and policy:
            # A full batch: the next in line may take a slot from someone above its share.
            head = policy.peek()
            victim = policy.admission_victim(head, running) if head is not None else None
            if victim is not None:
                self._preempt(victim)
                plan.preempted.append(victim)
        preempted = False
        i = 0
        block_size = self.blocks.block_size
        decode_only = True
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            decode_only = decode_only and n == 1 and seq.num_computed > 0
            # (Most steps a decode's token fits its last block: no call for it.)
            while (seq.num_computed + n > len(seq.block_table) * block_size
                   and not self.blocks.ensure_capacity(seq, seq.num_computed + n)):
                holder = next((p for p in self.paused if p.block_table), None)
                if holder is not None:
                    self._release_paused(holder)
                    continue
                victim = policy.victim(running)
                j = running.index(victim)
                if j < i:
                    # Already in this step's batch (a policy may pick any running sequence):
                    # take its row back.
                    budget += batch.pop(j)[1]
                    i -= 1
                self._preempt(victim)
                plan.preempted.append(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            batch.append((seq, n))
            budget -= n
            i += 1
        charges = policy.charges
        if charges:
            policy.charge(batch)            # before the admissions, which compare counters
        shield = policy.shields_newcomers
        seated_newcomer = False
        # While memory is short, admitting more would only cause more preemptions.
        while not preempted and budget > 0 and len(running) < self.max_num_seqs:
            seq = policy.peek()
            if seq is None:
                break
            first = shield and policy.first_seat(seq)
            if seated_newcomer and not first:
                # This step computes a newcomer's prompt: tenants that already hold seats
                # start their next prefills a step later, so its first token waits for a
                # short step, not for theirs (see VtcPolicy).
                break
            if not self._pin(seq):
                break                       # every adapter slot is pinned: it waits for one
            if self.blocks.allocate(seq) is None:
                holder = next((p for p in self.paused if p.block_table), None)
                if holder is None:
                    self._unpin(seq)
                    break
                self._release_paused(holder)
                continue
            policy.pop()
            self._count_waiting(seq, -1)
            seq.status = SeqStatus.RUNNING
            running.append(seq)
            admitted.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
            if charges:
                policy.charge([(seq, n)], more=True)
            seated_newcomer = seated_newcomer or first
        plan.decode_only = decode_only and not admitted
        return plan

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
            self.policy.remove(seq)
            self._count_waiting(seq, -1)
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
                self._free(seq)
            self.add(seq, front=True)

    def _pin(self, seq: Sequence) -> bool:
        """Pin the slot of the sequence's adapter (loading it there if need be); False
        when every slot is pinned by others. A sequence without an adapter needs none."""
        if seq.lora_slot is not None or seq.request is None:     # (scheduler tests make bare sequences)
            return True
        adapter = seq.request.request.adapter
        if adapter is None:
            return True
        assert self.adapters is not None, "the engine makes the adapter slots before it queues an adapter request"
        seq.lora_slot = self.adapters.slot(adapter)
        return seq.lora_slot is not None

    def _unpin(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            assert self.adapters is not None
            self.adapters.release(seq.lora_slot)
            seq.lora_slot = None

    def _free(self, seq: Sequence) -> None:
        """Give up the sequence's KV blocks and, with them, its adapter slot's pin: every
        place blocks are freed (finish, abort, preemption, a pause past its grace) goes here."""
        self.blocks.free(seq)
        self._unpin(seq)

    def _release_paused(self, seq: Sequence) -> None:
        self._free(seq)
        self.num_preemptions += 1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
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
            self.policy.remove(seq)
            self._count_waiting(seq, -1)
        self._free(seq)
        self.policy.finished(seq)
        seq.status = SeqStatus.FINISHED
