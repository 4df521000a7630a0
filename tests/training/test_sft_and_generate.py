"""SFT targets follow the chat template's mask; batched generation through the training
engine (synchronous, paged KV cache) equals step-by-step generation without a cache, and
sampled rows are reproducible from their own seeds whatever the batch."""

from __future__ import annotations

import pytest
import torch

from gpt.chat import render_chat
from gpt.tokenizer import END_OF_TURN
from server.engine.api import SamplingParams
from server.engine.offline import generate
from tests.conftest import make_tiny_model
from training.batching import IGNORE_INDEX
from training.decoding import training_engine
from training.stages.sft import sft_example


def test_sft_targets_cover_assistant_tokens_only(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "8"}]
    inputs, targets = sft_example(tiny_tokenizer, messages)
    ids = render_chat(tiny_tokenizer, messages).ids
    assert inputs == ids[:-1] and len(targets) == len(inputs)
    trained = [t for t in targets if t != IGNORE_INDEX]
    end = tiny_tokenizer.special(END_OF_TURN)
    assert trained == tiny_tokenizer.encode("5") + [end] + tiny_tokenizer.encode("8") + [end]
    # Each trained target is the token that follows its input position.
    for i, t in enumerate(targets):
        if t != IGNORE_INDEX:
            assert ids[i + 1] == t


def test_cached_batched_generation_matches_uncached(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=3)
    with torch.no_grad():
        for p in model.parameters():        # sharper logits than the 0.02 init: varied tokens
            p.mul_(8.0)
    prompts = [tiny_tokenizer.encode(t) for t in ("Hello there, how", "a", "The quick brown fox jumps over")]
    engine = training_engine(model, max_len=40, max_num_seqs=2)   # fewer rows than prompts
    gen = [o.token_ids for o in generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=8),
                                         [tiny_tokenizer.eot_id])]
    for prompt, out in zip(prompts, gen, strict=True):
        ids, ref = list(prompt), []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
                ref.append(nxt)
                ids.append(nxt)
                if nxt == tiny_tokenizer.eot_id:
                    break
        assert out == ref
    assert len({tuple(t) for t in gen}) > 1
    engine.blocks.check_whole()


def test_sampled_generation_is_reproducible_per_row(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=1)
    engine = training_engine(model, max_len=16)

    def params(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=6, seed=seed, logprobs=1)

    prompts = [tiny_tokenizer.encode("one two"), tiny_tokenizer.encode("three")]
    both = generate(engine, prompts, [params(11), params(22)], [tiny_tokenizer.eot_id])
    alone = generate(engine, prompts[1:], [params(22)], [tiny_tokenizer.eot_id])
    assert both[1].token_ids == alone[0].token_ids
    # The same tokens; their logprobs to float32 rounding (with the CPU attention kernel a
    # row's logprobs batched and alone were seen to differ in the 7th digit).
    assert both[1].choices[0].logprobs == pytest.approx(alone[0].choices[0].logprobs, rel=1e-5, abs=1e-6)
    assert all(len(o.token_ids) == len(o.choices[0].logprobs) for o in both)
    # Another seed draws another reply (6 tokens from ~500: a collision is vanishingly rare).
    assert generate(engine, prompts[1:], [params(23)], [tiny_tokenizer.eot_id])[0].token_ids != alone[0].token_ids
