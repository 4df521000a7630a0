"""`sol bench engine`'s bare forward loop computes what the engine computes: the same
greedy tokens for the same batch, on each attention path. Its ratio to the engine is
then the engine's overhead and nothing else."""

from __future__ import annotations

import pytest
import torch

from bench import engine as bench_engine
from bench.vs_vllm import lively_init
from server.engine.api import Delta, EngineRequest, SamplingParams
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from tests.conftest import make_tiny_model
from tests.engine.test_kv_cache import NEEDS_KERNEL


@pytest.mark.parametrize("attention", [pytest.param("in-place", marks=NEEDS_KERNEL), "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bare_loop_generates_the_engines_greedy_tokens(tiny_tokenizer, monkeypatch, attention, dtype):
    monkeypatch.setitem(bench_engine.ENGINE_SETTINGS, "attention", attention)
    model = make_tiny_model(tiny_tokenizer, tie_embeddings=False)
    lively_init(model, seed=3)       # context-dependent argmax, not one token repeated
    model = model.to(dtype)
    prompt = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog, then sleeps.")
    batch, new_tokens = 3, 10

    bare = bench_engine.bare_forward(model, prompt, batch, new_tokens, keep_tokens=True)

    engine = Engine(model, EngineConfig(device="cpu", dtype=dtype, num_blocks=32, attention=attention), start=False)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    streams = [engine.submit(EngineRequest(f"r{i}", list(prompt), params)) for i in range(batch)]
    engine.run_until_idle()
    want = [[t for event in s if isinstance(event, Delta) for t in event.token_ids] for s in streams]

    assert bare["token_ids"] == want
    assert len(set(want[0])) > 1, "a degenerate model (one token repeated) would prove nothing"
    assert bare["tokens"] == batch * new_tokens and bare["tokens_per_s"] > 0


def test_paired_steps_take_one_engine_step_per_bare_step(tiny_tokenizer):
    """The step-time ratio pairs each of the bare loop's steps with one whole engine
    iteration: the engine must prefill the batch in one step and then decode one token a
    step, or the pairs would compare different work (the bench refuses it)."""
    model = make_tiny_model(tiny_tokenizer, tie_embeddings=False)
    lively_init(model, seed=3)
    prompt = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog, then sleeps.")
    batch, new_tokens = 3, 10

    result = bench_engine.paired_steps(model, tiny_tokenizer, prompt, batch, new_tokens)

    assert result["bare"]["tokens"] == result["engine"]["tokens"] == batch * new_tokens
    assert result["bare"]["seconds"] > 0 and result["engine"]["seconds"] > 0
    assert set(result["decode_step_ms_p50"]) == {"bare", "engine"}
    assert result["decode_ratio"] > 0
