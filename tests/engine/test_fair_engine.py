"""Fair share in a real engine (tiny model): preemption and prefix reuse stay exact, and a
tenant's waiting requests are bounded on their own."""

from __future__ import annotations

import pytest
import torch

from server.engine.api import EngineOverloaded, EngineRequest, SamplingParams
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.output import OutputProcessor, TokenTexts
from tests.engine.conftest import collect, reference_greedy


def submit(engine, rid, prompt, tenant, weight=1.0, priority=0, max_tokens=16):
    request = EngineRequest(request_id=rid, prompt_ids=list(prompt),
                            params=SamplingParams(temperature=0.0, max_tokens=max_tokens),
                            tenant=tenant, tenant_weight=weight, priority=priority)
    stream = engine.submit(request)
    stream.processor = OutputProcessor(request, engine.test_texts, stream.abort_choice)
    return stream


def test_fair_share_keeps_greedy_outputs_exact_under_preemption_and_prefix_reuse(model, prompts, tiny_tokenizer,
                                                                                  make_engine):
    system = tiny_tokenizer.encode("You are a helpful assistant. Answer briefly. ")
    work = [(f"t{i % 3}", system + p) for i, p in enumerate(prompts)] * 2
    outputs = {}
    for scheduling in ("fcfs", "fair"):
        # 24 blocks of 4 cannot hold fourteen sequences: preemptions; the shared system
        # prompt comes from the prefix cache after the first request.
        engine = make_engine(model, block_size=4, num_blocks=24, max_num_seqs=6, max_num_batched_tokens=16,
                             scheduling=scheduling)
        streams = [submit(engine, f"r{i}", p, tenant, weight=1.0 + (tenant == "t0"), priority=i % 2)
                   for i, (tenant, p) in enumerate(work)]
        outputs[scheduling] = [collect(s, p, 1).token_ids for s, (_, p) in zip(streams, work, strict=True)]
        stats = engine.stats(top_tenants=2)
        assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
        assert stats.policy == scheduling
        engine.blocks.check_whole()
    assert outputs["fair"] == outputs["fcfs"]
    for (_, p), got in zip(work[:3], outputs["fair"][:3], strict=True):
        assert got == reference_greedy(model, p, 16)


def test_waiting_requests_are_bounded_per_tenant(model, tiny_tokenizer):
    # A synchronous engine whose steps are not run: submissions stay waiting.
    engine = Engine(model, EngineConfig(device="cpu", dtype=torch.float32, scheduling="fair",
                                        max_waiting_per_tenant=2), start=False)
    engine.test_texts = TokenTexts(tiny_tokenizer.decode_bytes)
    for i in range(2):
        submit(engine, f"a{i}", [1, 2, 3], "a")
    with pytest.raises(EngineOverloaded, match="tenant a has 2 requests waiting"):
        submit(engine, "a2", [1, 2, 3], "a")
    submit(engine, "b0", [1, 2, 3], "b")             # another tenant is not affected
    engine.run_until_idle()                          # once they have started, a can submit again
    submit(engine, "a3", [1, 2, 3], "a")
    engine.run_until_idle()


def test_unknown_scheduling_is_refused(model, make_engine):
    with pytest.raises(ValueError, match="scheduling must be one of fcfs, fair"):
        make_engine(model, scheduling="lottery")
