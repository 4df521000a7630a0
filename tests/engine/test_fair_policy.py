"""Fair share (server/engine/fair_policy.py), checked step by step without a model: the
service gap between backlogged tenants stays within the derived bound, weights give
proportional service, an idle tenant banks no credit, the right tenant gives way, and
priorities and bands order the queue."""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict

import pytest

from server.engine.api import BAND_BATCH, EngineRequest, RequestTimings, SamplingParams
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.scheduler import Scheduler, StepPlan
from server.engine.sequence import RequestState, SeqStatus, Sequence

W_IN, W_OUT = 1.0, 2.0
_ids = itertools.count()


def request(tenant: str, prompt_len: int, max_tokens: int, weight: float = 1.0, priority: int = 0,
            band: int = 0, rng: random.Random | None = None, arrival: float | None = None) -> Sequence:
    rng = rng or random.Random(next(_ids))
    # Distinct prompts: no prefix-cache hits unless a test wants them.
    prompt = [rng.randrange(1, 1000) for _ in range(prompt_len)]
    req = EngineRequest(f"r{next(_ids)}", prompt, SamplingParams(max_tokens=max_tokens), tenant=tenant,
                        tenant_weight=weight, tenant_band=band, priority=priority, input_cost=W_IN,
                        output_cost=W_OUT)
    state = RequestState(req, RequestTimings(arrival=time.monotonic() if arrival is None else arrival), frozenset())
    seq = Sequence(request=state, index=0, token_ids=list(prompt), num_prompt_tokens=prompt_len, seed=0)
    state.sequences.append(seq)
    return seq


def tenant_of(seq: Sequence) -> str:
    return seq.request.request.tenant


class Sim:
    """The engine's side of a step: tokens computed, one sampled per row at its end, a
    sequence finished at max_tokens; service measured per tenant as the tokens served
    (each prompt token once at W_IN, each generated one at W_OUT), independently of the
    policy's counters."""

    def __init__(self, scheduling: str = "fair", max_num_seqs: int = 4, budget: int = 32, num_blocks: int = 4096,
                 block_size: int = 4) -> None:
        self.blocks = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                            scheduling=scheduling), self.blocks, max_seq_len=4096)
        self.service: dict[str, float] = defaultdict(float)
        self.preempted: list[Sequence] = []
        self.done: dict[int, int] = {}      # prompt tokens served, per sequence

    def step(self) -> StepPlan:
        plan = self.sched.schedule()
        self.preempted += plan.preempted
        finished = []
        for seq, n in plan.batch:
            start, done = seq.num_computed, self.done.get(seq.seq_id, 0)
            end = min(start + n, seq.num_prompt_tokens)
            if end > done:            # (a recompute after a preemption serves no new token)
                self.service[tenant_of(seq)] += W_IN * (end - max(start, done))
                self.done[seq.seq_id] = end
            seq.num_computed += n
            if seq.num_computed // self.blocks.block_size > seq.num_hashed_blocks:
                self.blocks.register_full_blocks(seq)
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(7)
                self.service[tenant_of(seq)] += W_OUT
                if seq.num_output_tokens >= seq.params.max_tokens:
                    finished.append(seq)
        for seq in finished:
            self.sched.finish(seq)
        return plan

    def waiting_of(self, tenant: str) -> int:
        pol = self.sched.policy
        if hasattr(pol, "tenants"):
            t = pol.tenants.get(tenant)
            return len(t.queue) if t else 0
        return sum(1 for s in pol.queue if tenant_of(s) == tenant)

    def keep_backlogged(self, tenant: str, depth: int, **kw) -> None:
        while self.waiting_of(tenant) < depth:
            self.sched.add(request(tenant, **kw))


# A tenant's largest request: 12 prompt tokens, 8 generated.
L, M = 12, 8
C = W_IN * L + W_OUT * M
B = 4            # max_num_seqs


def test_service_gap_between_backlogged_tenants_stays_within_the_bound():
    """Bound (fair_policy.py's docstring): c_f - c_g <= B * C for backlogged f, g, where
    C is f's largest request cost over its weight; with equal weights c = service."""
    sim = Sim(max_num_seqs=B)
    worst = 0.0
    for _ in range(600):
        # The heavy tenant floods (long prompts, deep queue); the light one asks little.
        sim.keep_backlogged("heavy", 16, prompt_len=L, max_tokens=M)
        sim.keep_backlogged("light", 2, prompt_len=3, max_tokens=M)
        sim.step()
        worst = max(worst, abs(sim.service["heavy"] - sim.service["light"]))
        assert worst <= B * C, (sim.service, worst)
    assert min(sim.service.values()) > 20 * B * C    # long enough for the bound to mean something


def test_fcfs_lets_the_flooding_tenant_run_away():
    """The same workload under FCFS: the gap grows without bound (the check above can fail)."""
    sim = Sim("fcfs", max_num_seqs=B)
    for _ in range(600):
        sim.keep_backlogged("heavy", 16, prompt_len=L, max_tokens=M)
        sim.keep_backlogged("light", 2, prompt_len=3, max_tokens=M)
        sim.step()
    assert sim.service["heavy"] - sim.service["light"] > 10 * B * C


def test_weights_two_to_one_give_two_to_one_service():
    """|S_a / 2 - S_b| <= B * C (the bound on counters), so S_a / S_b is 2 within
    2 * B * C / S_b: under 3% after 3000 steps here; the test allows 5%."""
    sim = Sim(max_num_seqs=B)
    for _ in range(3000):
        sim.keep_backlogged("a", 8, prompt_len=L, max_tokens=M, weight=2.0)
        sim.keep_backlogged("b", 8, prompt_len=L, max_tokens=M, weight=1.0)
        sim.step()
        assert abs(sim.service["a"] / 2 - sim.service["b"]) <= B * C
    ratio = sim.service["a"] / sim.service["b"]
    assert abs(ratio - 2.0) <= 2.0 * 0.05, ratio


def test_weights_two_to_one_give_two_to_one_service_with_the_benchs_shape():
    """`sol bench fairness`'s shares phase without a model: a batch of 8, prompts of 128
    in one chunk, 32 generated, both tenants backlogged from the first step. The seats a
    step fills are split by the counters as they are charged (not by the counters the
    step began with, which gave the first tenant in line every seat of the first step), and
    the service is 2:1 within 10% from a few batches' worth of requests on."""
    sim = Sim(max_num_seqs=8, budget=512, block_size=16, num_blocks=100_000)
    c = W_IN * 128 + W_OUT * 32
    for step in range(1, 1201):
        sim.keep_backlogged("a", 16, prompt_len=128, max_tokens=32, weight=2.0)
        sim.keep_backlogged("b", 16, prompt_len=128, max_tokens=32, weight=1.0)
        sim.step()
        if step == 3:
            # The batch is full: 2:1 of 8 seats is 5.3 : 2.7.
            seats = {t.name: n for t, n in sim.sched.policy.batch_counts.items()}
            assert seats == {"a": 5, "b": 3}, seats
        assert abs(sim.service["a"] / 2 - sim.service["b"]) <= 8 * c / 2     # c over a's weight
        if sim.service["b"] >= 10 * c:
            ratio = sim.service["a"] / sim.service["b"]
            assert abs(ratio / 2 - 1) <= 0.10, (step, ratio)
    assert sim.service["b"] > 100 * c


def test_light_tenants_first_token_beside_a_full_batch_waits_one_short_step():
    """A closed-loop light tenant (one request at a time) beside a heavy one that keeps the
    batch full of long prompts. Each light request is admitted in the first step after it
    arrives, taking a seat from the heavy tenant when the batch is full, and that step
    computes its prompt beside only the heavy tenant's running rows: the heavy tenant's
    next prefills start a step later, so the light first token waits for a step of about
    its own size (solo: its prompt alone), not one of several 128-token prompts. FCFS, the
    same load: it waits for whole heavy requests."""
    waits: dict[str, list[int]] = {}
    for scheduling in ("fair", "fcfs"):
        sim = Sim(scheduling, max_num_seqs=8, budget=512, block_size=16, num_blocks=100_000)
        light: Sequence | None = None
        arrived = 0
        steps_to_first: list[int] = []
        full_on_arrival = 0
        ended = 0
        for step in range(600):
            sim.keep_backlogged("heavy", 32, prompt_len=128, max_tokens=32)
            if light is not None and light.is_finished and not ended:
                ended = step
            # Its next request comes a step after the last one ended (the reply's round
            # trip), when the heavy tenant has taken the seat it left; and the heavy tenant
            # fills the batch first.
            if step >= 2 and (light is None or ended and step > ended):
                light, arrived, ended = request("light", 16, 16), step, 0
                full_on_arrival += len(sim.sched.running) == 8
                sim.sched.add(light)
            got_first = light is not None and light.num_output_tokens == 0
            plan = sim.step()
            if got_first and light.num_output_tokens == 1:   # (light is set: got_first says so)
                steps_to_first.append(step - arrived + 1)
                if scheduling == "fair":
                    # Its prompt, and one token for each other row: decodes, no new prefill.
                    others = [(tenant_of(s), n) for s, n in plan.batch if s is not light]
                    assert all(n == 1 for _, n in others), others
                    assert sum(n for _, n in plan.batch) <= 16 + 7
        waits[scheduling] = steps_to_first
        if scheduling == "fair":
            assert full_on_arrival > 10                       # it did arrive into full batches
            assert steps_to_first and max(steps_to_first) == 1, steps_to_first
    assert sorted(waits["fcfs"])[len(waits["fcfs"]) // 2] > 10, waits["fcfs"]


def test_idle_tenant_does_not_bank_credit():
    sim = Sim(max_num_seqs=B)
    for _ in range(300):                  # only "busy" works; "idle" submits nothing
        sim.keep_backlogged("busy", 8, prompt_len=L, max_tokens=M)
        sim.step()
    pol = sim.sched.policy
    floor = pol.tenants["busy"].counter
    before = dict(sim.service)
    sim.keep_backlogged("idle", 8, prompt_len=L, max_tokens=M)
    assert pol.tenants["idle"].counter == pytest.approx(floor)   # lifted to the active minimum
    for _ in range(200):
        sim.keep_backlogged("busy", 8, prompt_len=L, max_tokens=M)
        sim.keep_backlogged("idle", 8, prompt_len=L, max_tokens=M)
        sim.step()
    busy = sim.service["busy"] - before["busy"]
    idle = sim.service["idle"]
    # From its return on, the returning tenant gets its share, not the 300 steps it missed:
    # without the lift it would hold the whole batch for about that long.
    assert abs(busy - idle) <= B * C, (busy, idle)
    assert busy > 0.4 * (busy + idle)


def test_newcomer_takes_a_slot_from_the_tenant_furthest_above_its_share():
    sim = Sim(max_num_seqs=B)
    for _ in range(50):
        sim.keep_backlogged("hog", 8, prompt_len=L, max_tokens=4 * M)
        sim.step()
    assert len(sim.sched.running) == B
    light = request("light", 3, M)
    sim.sched.add(light)
    sim.step()
    # Without preemption it would wait for one of hog's requests to finish (4 * M tokens).
    assert light.status is SeqStatus.RUNNING
    assert [tenant_of(s) for s in sim.preempted] == ["hog"]
    sim.step()
    assert len(sim.preempted) == 1        # one slot, not one per step


def test_memory_preemption_takes_from_the_tenant_furthest_above_its_share():
    # 6 blocks of 4: a decoding sequence that needs a block takes one from the tenant with
    # the highest counter, although the other tenant's sequence is the newest (FCFS's victim).
    sim = Sim(max_num_seqs=4, budget=64, num_blocks=6)
    pol = sim.sched.policy
    rich, other, poor = request("rich", 5, 20), request("rich", 5, 20), request("poor", 5, 20)
    for s in (rich, other, poor):
        sim.sched.add(s)
        sim.step()                        # 2 blocks each: the pool is full
    pol.tenants["rich"].counter += 1000   # rich has been served far above its share
    for _ in range(4):
        sim.step()
    assert sim.preempted and all(tenant_of(s) == "rich" for s in sim.preempted)
    assert poor.status is SeqStatus.RUNNING
    for s in (rich, other, poor):
        if not s.is_finished:
            sim.sched.finish(s)
    sim.blocks.check_whole()


def test_priority_orders_a_tenants_requests_and_bands_order_tenants():
    sim = Sim(max_num_seqs=1, budget=64)
    late, urgent = request("t", 3, 1, priority=5), request("t", 3, 1, priority=-1)
    bulk, chat = request("bulk", 3, 1, band=BAND_BATCH), request("chat", 3, 1)
    seqs = [late, bulk, urgent, chat]
    for s in seqs:
        sim.sched.add(s)
    sim.sched.policy.tenants["chat"].counter = 50.0
    order: list[Sequence] = []
    while sim.sched.has_work():           # one request a step (one slot, one token each)
        sim.step()
        order += [s for s in seqs if s.is_finished and s not in order]
    # Interactive tenants by counter ("t" below "chat"), "t"'s requests by priority, and
    # the batch band last: it runs once no interactive tenant waits.
    assert order == [urgent, late, chat, bulk]


def test_batch_band_ages_into_the_interactive_order():
    sim = Sim(max_num_seqs=1, budget=64)
    sim.sched.policy.band_aging_s = 1.0
    old = request("bulk", 3, 1, band=BAND_BATCH, arrival=time.monotonic() - 2.0)   # waited past the bound
    fresh = request("chat", 3, 1)
    sim.sched.add(fresh)
    sim.sched.add(old)
    sim.sched.policy.tenants["chat"].counter = 10.0
    sim.step()
    assert old.status is SeqStatus.RUNNING or old.is_finished
    assert fresh.status is SeqStatus.WAITING


def test_cached_prefix_is_charged_at_the_cached_rate_and_recompute_is_free():
    sim = Sim(max_num_seqs=2, budget=64)
    pol = sim.sched.policy
    sim.sched.add(request("u", 3, 50))                # another tenant, active throughout
    shared = list(range(1, 17))                       # 4 full blocks
    first = request("t", 16, 1)
    first.token_ids[:] = list(shared)
    sim.sched.add(first)
    sim.step()                                        # computes 16 prompt tokens, samples 1
    assert pol.tenants["t"].counter == pytest.approx(16 * W_IN + W_OUT)
    second = request("t", 17, 1)
    second.token_ids[:] = shared + [99]
    sim.sched.add(second)
    t = pol.tenants["t"]
    before = t.counter
    sim.step()
    # 16 tokens from the cache at 0.1 x W_IN, 1 computed at W_IN, 1 generated.
    assert t.counter - before == pytest.approx(16 * W_IN * 0.1 + W_IN + W_OUT)
