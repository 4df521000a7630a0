"""The offline helper: a synchronous engine is stepped on the caller's thread call after
call (also past its waiting-queue limit), one SamplingParams per prompt is honoured, and
what comes back is token ids, finish reasons, chosen-token log-probs and usage."""

from __future__ import annotations

import pytest
import torch

from server.engine.api import SamplingParams
from server.engine.config import EngineConfig
from server.engine.offline import build_engine, generate, live_config
from tests.engine.conftest import reference_greedy


def test_a_synchronous_engine_serves_call_after_call_past_its_queue_limit(model, prompts, tiny_tokenizer):
    engine = build_engine(model, EngineConfig(device="cpu", dtype=torch.float32, max_waiting=3,
                                                              num_blocks=128, max_num_seqs=2), start=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=5)
    expected = [reference_greedy(model, p, 5) for p in prompts]
    for _ in range(3):       # 7 prompts per call, 3 waiting at most: chunks, and no leftover count
        outs = generate(engine, prompts, greedy)
        assert [o.token_ids for o in outs] == expected
        assert all(o.choices[0].finish_reason == "length" for o in outs)
        assert [o.usage.prompt_tokens for o in outs] == [len(p) for p in prompts]
        assert all(o.usage.completion_tokens == 5 for o in outs)
    assert engine.thread is None and engine.stats().waiting == 0
    engine.blocks.check_whole()


def test_per_prompt_params_and_logprobs(model, prompts, tiny_tokenizer):
    engine = build_engine(model, live_config(model, num_blocks=128), start=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, logprobs=1 if n == 4 else 0) for n in (3, 4)]
    short, logged = generate(engine, prompts[:2], params)
    assert len(short.token_ids) == 3 and short.choices[0].logprobs == []
    assert len(logged.token_ids) == 4 and len(logged.choices[0].logprobs) == 4
    assert all(lp <= 0.0 for lp in logged.choices[0].logprobs)
    with pytest.raises(ValueError, match="one SamplingParams per prompt"):
        generate(engine, prompts[:2], params[:1])


def test_live_config_keeps_the_model_uncopied(model, tiny_tokenizer):
    engine = build_engine(model, live_config(model, num_blocks=16), start=False)
    assert engine.model is model
    converted = build_engine(model, EngineConfig(device="cpu", dtype=torch.bfloat16,
                                                                 num_blocks=16), start=False)
    assert converted.model is not model and next(model.parameters()).dtype == torch.float32
