"""Fair share between tenants: a virtual token counter per tenant (after VTC, "Fairness in
Serving Large Language Models", OSDI 2024), with weighted shares, two priority bands and
request priorities within a tenant.

The counter. Every step, each tenant's counter grows by the work the step does for it:
`input_cost` per prompt token computed and `output_cost` per token generated, divided by
the tenant's weight (so a weight-2 tenant's counter grows half as fast for the same work).
A prompt token found in the prefix cache is charged `cached_cost_fraction` of the input
cost once, at admission. Work is charged once per token position: a sequence recomputed
after a preemption or a pause pays nothing for the tokens it had already paid for (its
high-water mark, `Sequence.charged`), only for each new token it samples.

Who goes next. Among the tenants with waiting sequences, the one with the lowest
(band, counter) is admitted next (ties by arrival), and within a tenant the request with
the lowest priority value, then the oldest. The policy is work-conserving: whenever a
sequence waits and the batch has room, one is admitted, whatever the counters.

No banked credit. A tenant with no sequence in the engine that submits one has its
counter lifted to the lowest counter among the active tenants of its band: an idle spell
earns nothing, so a returning tenant competes as an equal, not as a creditor.

Giving way. When a running sequence needs a block and none is free, the newest running
sequence of the tenant furthest above its share (highest band, then highest counter) is
preempted. When the batch is full (max_num_seqs) and the next tenant in line has nothing
running, the newest sequence of the running tenant furthest above it gives up its slot
(that tenant keeps at least one): without this a newcomer waits for another tenant's
request to finish, however long. Only a tenant with no slot at all takes one, so slots do
not change hands every step.

A newcomer's step. A step that gives a tenant its first seat (it had no sequence in the
batch) seats no tenant that already has one: their next prefills start a step later. So a
light tenant's first token waits for a step of its own prompt beside the running rows'
decodes, not for a step that also computes several long prompts of the tenant it took the
seat from (measured before this rule, in-process beside `sol bench fairness`'s heavy
tenant: the light tenant's first step carried 56-195 heavy prefill tokens on average and
took 2-6x a decode step). It costs those seats one step (a decode step) each time a
newcomer arrives; tenants that are all newcomers (many keys, a request each) are seated
together as before.

Counters within a step. Running rows are charged before the admissions, and each
admitted row as it joins, so every choice in a step sees the step's work so far: with the
counters the step began with, every seat one step fills went to one tenant.

The bound. For two tenants f and g that stay backlogged, f is only admitted while
c_f <= c_g; after that f's counter grows only through the sequences it already runs, at
most B = max_num_seqs of them, each charging at most C = (input_cost * L_prompt +
output_cost * max_tokens) / w_f in all. So c_f - c_g <= B * C at every step, and the
service gap |S_f / w_f - S_g / w_g| is bounded by the same amount, independent of how long
both stay backlogged (tests/engine/test_fair_policy.py checks it step by step).

Bands. Interactive tenants (band 0) go before batch tenants (band 1); a batch tenant is
served whenever no interactive tenant waits, and one whose oldest waiting sequence has
waited `band_aging_s` is ordered as interactive, so a flood of interactive work delays
batch work by at most that long before it competes on counters again.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from server.engine.api import TenantStats
from server.engine.config import EngineConfig
from server.engine.policy import SchedulingPolicy
from server.engine.sequence import Sequence


@dataclass(eq=False, slots=True)
class Tenant:
    name: str
    weight: float = 1.0
    band: int = 0
    counter: float = 0.0                 # service received / weight, in cost units
    live: int = 0                        # its sequences in the scheduler (any state)
    # Waiting sequences: (priority, order, seq_id, seq), a heap.
    queue: list[tuple[int, int, int, Sequence]] = field(default_factory=list)


class VtcPolicy(SchedulingPolicy):
    name = "fair"
    charges = True
    preempts_to_admit = True
    shields_newcomers = True

    def __init__(self, config: EngineConfig) -> None:
        self.band_aging_s = config.band_aging_s
        self.cached_fraction = config.cached_cost_fraction
        self.tenants: dict[str, Tenant] = {}
        self.backlogged: set[Tenant] = set()     # tenants with a waiting sequence
        self.num_waiting = 0
        self._order = itertools.count(1)
        self._front = itertools.count(-1, -1)
        self._next: Tenant | None = None         # peek's choice, for pop
        self._forced: Tenant | None = None       # admission_victim's beneficiary
        # Sequences per tenant in the last step's batch (kept by charge).
        self.batch_counts: dict[Tenant, int] = {}

    # --- the queue ------------------------------------------------------------------------
    def add(self, seq: Sequence, front: bool = False) -> None:
        tenant = seq.tenant
        if tenant is None:
            tenant = self._enter(seq)
        heapq.heappush(tenant.queue, (seq.request.request.priority,
                                      next(self._front) if front else next(self._order), seq.seq_id, seq))
        self.backlogged.add(tenant)
        self.num_waiting += 1
        self._next = None

    def _enter(self, seq: Sequence) -> Tenant:
        """A sequence new to the scheduler: its tenant, its costs, and the lift of a tenant
        that was idle."""
        req = seq.request.request
        tenant = self.tenants.get(req.tenant)
        if tenant is None:
            tenant = self.tenants[req.tenant] = Tenant(req.tenant)
        # The latest request carries the key's current settings.
        tenant.weight = req.tenant_weight if req.tenant_weight > 0 else 1.0
        tenant.band = req.tenant_band
        if tenant.live == 0:
            floor = self._active_floor(tenant.band)
            if floor is not None and floor > tenant.counter:
                tenant.counter = floor
        tenant.live += 1
        seq.tenant = tenant
        seq.cost_in = req.input_cost / tenant.weight
        seq.cost_out = req.output_cost / tenant.weight
        return tenant

    def _active_floor(self, band: int) -> float | None:
        counters = [t.counter for t in self.tenants.values() if t.live and t.band == band]
        return min(counters) if counters else None

    def remove(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if tenant is None:
            return
        for i, entry in enumerate(tenant.queue):
            if entry[3] is seq:
                tenant.queue[i] = tenant.queue[-1]
                tenant.queue.pop()
                heapq.heapify(tenant.queue)
                self.num_waiting -= 1
                if not tenant.queue:
                    self.backlogged.discard(tenant)
                self._next = None
                return

    def _rank(self, tenant: Tenant, now: float) -> tuple[int, float, int, int]:
        """The order of tenants: band (aged), counter, then, on a tie (a tenant just
        lifted to the others' counter), the one with fewer sequences in the batch, then
        arrival."""
        head = tenant.queue[0]
        band = tenant.band
        if band and now - head[3].request.timings.arrival >= self.band_aging_s:
            band = 0
        return band, tenant.counter, self.batch_counts.get(tenant, 0), head[1]

    def peek(self) -> Sequence | None:
        if not self.backlogged:
            return None
        if self._forced is not None:
            # admission_victim freed a slot for this tenant: it goes next, whatever the tie
            # with the victim's tenant (whose sequence is back at the front of its queue).
            self._next, self._forced = self._forced, None
        if self._next is None or not self._next.queue:
            if len(self.backlogged) == 1:
                (self._next,) = self.backlogged
            else:
                now = time.monotonic()
                self._next = min(self.backlogged, key=lambda t: self._rank(t, now))
        return self._next.queue[0][3]

    def pop(self) -> Sequence:
        if self.peek() is None:
            raise IndexError("no sequence waits")
        tenant = self._next
        assert tenant is not None
        seq = heapq.heappop(tenant.queue)[3]
        if not tenant.queue:
            self.backlogged.discard(tenant)
        self.num_waiting -= 1
        # Counters move every step, so the next choice is made afresh.
        self._next = None
        cached = seq.num_computed - seq.charged
        if cached > 0 and seq.charged < seq.num_prompt_tokens:
            # Prompt tokens the prefix cache served, charged once at the cached rate.
            cached = min(seq.num_computed, seq.num_prompt_tokens) - seq.charged
            tenant.counter += cached * seq.cost_in * self.cached_fraction
            seq.charged += cached
        return seq

    def __len__(self) -> int:
        return self.num_waiting

    # --- charging ---------------------------------------------------------------------------
    def charge(self, batch: list[tuple[Sequence, int]], more: bool = False) -> None:
        # The one pass over the step's rows fair share adds (locals: it runs every step).
        # Admitted rows are charged one by one as they join (more=True), so the next choice
        # in the same step sees them: otherwise every seat a step fills would go to the
        # tenant that was lowest when the step began.
        counts: dict[Tenant, int] = self.batch_counts if more else {}
        get = counts.get
        for seq, n in batch:
            tenant = seq.tenant
            counts[tenant] = get(tenant, 0) + 1
            start = seq.num_computed
            end = start + n
            prompt = seq.num_prompt_tokens
            if start >= prompt:
                # A decode row (or the recompute of output tokens): only what it samples.
                if end == len(seq.token_ids):
                    tenant.counter += seq.cost_out
                continue
            cost = 0.0
            charged = seq.charged
            if end > charged:
                prompt_end = end if end < prompt else prompt
                new = prompt_end - (start if start > charged else charged)
                if new > 0:
                    cost += new * seq.cost_in
                    seq.charged = prompt_end
            if end == len(seq.token_ids):
                cost += seq.cost_out
            tenant.counter += cost
        self.batch_counts = counts

    def first_seat(self, seq: Sequence) -> bool:
        return not self.batch_counts.get(seq.tenant)

    # --- victims ------------------------------------------------------------------------------
    def victim(self, running: list[Sequence]) -> Sequence:
        worst = max({seq.tenant for seq in running}, key=lambda t: (t.band, t.counter))
        for seq in reversed(running):
            if seq.tenant is worst:
                return seq
        return running[-1]

    def admission_victim(self, candidate: Sequence, running: list[Sequence]) -> Sequence | None:
        mine = candidate.tenant
        counts = self.batch_counts
        if mine is None or counts.get(mine):
            return None
        rank = self._rank(mine, time.monotonic())[:2]
        over = [t for t, n in counts.items() if n >= 2 and t is not mine and (t.band, t.counter) >= rank]
        if not over:
            return None
        worst = max(over, key=lambda t: (t.band, t.counter))
        for seq in reversed(running):
            if seq.tenant is worst:
                counts[worst] -= 1
                self._forced = mine
                return seq
        return None

    # --- leaving --------------------------------------------------------------------------------
    def finished(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if tenant is None:
            return
        seq.tenant = None
        tenant.live -= 1
        if tenant.live:
            return
        self.batch_counts.pop(tenant, None)
        # An idle tenant is remembered only while its counter says more than the lift on
        # its return would (it was served above the active tenants): the rest are forgotten.
        floor = self._active_floor(tenant.band)
        if floor is None or tenant.counter <= floor:
            del self.tenants[tenant.name]
        if not any(t.live for t in self.tenants.values()):
            self.tenants.clear()          # nobody is active: there is nothing to be fair to

    def tenant_stats(self, top_k: int) -> list[TenantStats]:
        counts = dict(self.batch_counts)
        rows = [TenantStats(t.name, counts.get(t, 0), len(t.queue), t.counter, t.weight)
                for t in list(self.tenants.values()) if t.live]
        rows.sort(key=lambda r: (-(r.running + r.waiting), r.tenant))
        return rows[:top_k]
