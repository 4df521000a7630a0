"""Many LoRA adapters over one base model in one engine: a row on an adapter, batched
with rows on other adapters and on the base, decodes as the merged model alone does;
prefix-cache blocks are never shared across adapters; more adapters than slots all
complete (they wait for a slot); every finish, abort and preemption gives its pin back."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt.lora import TARGETS, LoraAdapter, LoraSpec, merge_into
from server.engine.adapter_slots import AdapterRef
from server.engine.api import EngineRequest, SamplingParams
from server.engine.config import EngineConfig
from server.engine.offline import build_engine, generate

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=1)


def adapter(model, seed: int, rank: int = 4, targets: tuple[str, ...] = tuple(TARGETS)) -> AdapterRef:
    weights = LoraAdapter.zeros_like(LoraSpec(rank, 2.0 * rank, targets), model.config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    for _, b in weights.weights.values():
        b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
    return AdapterRef(f"ad{seed}", 1, weights)


def engine(model, **overrides):
    cfg = dict(device="cpu", dtype=torch.float32, num_blocks=128, max_loras=2, max_lora_rank=8)
    cfg.update(overrides)
    return build_engine(model, EngineConfig(**cfg), start=False)


def merged_outputs(model, ref: AdapterRef | None, prompts, params=GREEDY):
    alone = model if ref is None else merge_into(copy.deepcopy(model), ref.weights)
    return generate(engine(alone), prompts, params)


def assert_same(got, want):
    assert got.token_ids == want.token_ids
    assert got.choices[0].logprobs == pytest.approx(want.choices[0].logprobs, abs=1e-4)


def test_mixed_batch_matches_each_merged_model(model, prompts):
    a, b = adapter(model, 1), adapter(model, 2, rank=8, targets=("q", "v", "down"))
    rows = [(prompts[0], a), (prompts[1], b), (prompts[2], None), (prompts[3], a), (prompts[4], None)]
    eng = engine(model)
    got = generate(eng, [p for p, _ in rows], GREEDY, adapters=[r for _, r in rows])
    for (prompt, ref), out in zip(rows, got, strict=True):
        assert_same(out, merged_outputs(model, ref, [prompt])[0])
    # The adapters change the output (else the comparison above proves nothing).
    assert got[0].token_ids != merged_outputs(model, None, [prompts[0]])[0].token_ids
    assert eng.scheduler.adapters is not None and not eng.scheduler.adapters.running()
    eng.blocks.check_whole()


def test_no_adapter_request_makes_no_stack(model, prompts):
    eng = engine(model)
    generate(eng, prompts[:2], GREEDY)
    assert eng.scheduler.adapters is None and eng.runner.lora_stack is None


def test_the_prefix_cache_is_not_shared_across_adapters(model, prompts):
    a, b = adapter(model, 3), adapter(model, 4)
    long = prompts[3] * 2
    eng = engine(model)
    first = generate(eng, [long], GREEDY, adapters=[a])[0]
    again = generate(eng, [long], GREEDY, adapters=[a])[0]
    other = generate(eng, [long], GREEDY, adapters=[b])[0]
    base = generate(eng, [long], GREEDY)[0]
    assert again.usage.cached_tokens > 0                  # the same adapter reuses its blocks
    assert other.usage.cached_tokens == 0 and base.usage.cached_tokens == 0
    assert_same(first, merged_outputs(model, a, [long])[0])
    assert_same(other, merged_outputs(model, b, [long])[0])
    assert_same(base, merged_outputs(model, None, [long])[0])


def test_more_adapters_than_slots_wait_and_all_complete(model, prompts):
    refs = [adapter(model, 10 + i) for i in range(5)]
    eng = engine(model, max_loras=2)
    rows = [(prompts[i % len(prompts)], refs[i % 5]) for i in range(10)]
    got = generate(eng, [p for p, _ in rows], GREEDY, adapters=[r for _, r in rows])
    assert all(o.choices[0].finish_reason == "length" for o in got)
    for (prompt, ref), out in list(zip(rows, got, strict=True))[:5]:
        assert_same(out, merged_outputs(model, ref, [prompt])[0])
    assert eng.scheduler.adapters.loads >= 5 and not eng.scheduler.adapters.running()


def test_preemption_and_abort_give_pins_back(model, prompts):
    refs = [adapter(model, 20), adapter(model, 21)]
    # A pool too small for every sequence at once: some are preempted and recomputed.
    eng = engine(model, num_blocks=5, max_loras=2)
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1)
    rows = [(prompts[i], refs[i % 2]) for i in (0, 1, 4, 6)]
    got = generate(eng, [p for p, _ in rows], params, adapters=[r for _, r in rows])
    assert eng.scheduler.num_preemptions > 0
    for (prompt, ref), out in zip(rows, got, strict=True):
        assert_same(out, merged_outputs(model, ref, [prompt], params)[0])
    slots = eng.scheduler.adapters
    assert not slots.running()
    stream = eng.submit(EngineRequest("abort-me", prompts[0], params, adapter=refs[0]))
    eng.run_step()
    assert slots.running() == [refs[0].name]
    eng.abort("abort-me")
    eng.run_until_idle()
    assert list(stream)[-1].__class__.__name__ == "RequestFinished" and not slots.running()


def test_a_rank_above_the_engine_limit_is_refused(model, prompts):
    eng = engine(model, max_lora_rank=4)
    with pytest.raises(ValueError, match="max_lora_rank"):
        eng.submit(EngineRequest("r", prompts[0], GREEDY, adapter=adapter(model, 5, rank=8)))
