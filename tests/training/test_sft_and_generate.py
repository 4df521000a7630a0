"""SFT targets follow the chat template's mask; batched generation with the padded KV
cache equals step-by-step generation without a cache."""

from __future__ import annotations

import torch

from gpt.chat import render_chat
from gpt.tokenizer import END_OF_TURN
from tests.conftest import make_tiny_model
from training.batching import IGNORE_INDEX
from training.generate import generate
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
    gen = generate(model, prompts, 8, stop_ids=[tiny_tokenizer.eot_id])
    for prompt, out in zip(prompts, gen.tokens, strict=True):
        ids, ref = list(prompt), []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
                ref.append(nxt)
                ids.append(nxt)
                if nxt == tiny_tokenizer.eot_id:
                    break
        assert out == ref
    assert len({tuple(t) for t in gen.tokens}) > 1


def test_sampled_generation_is_reproducible_per_row(tiny_tokenizer):
    from server.engine.api import SamplingParams

    model = make_tiny_model(tiny_tokenizer, seed=1)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    prompts = [tiny_tokenizer.encode("one two"), tiny_tokenizer.encode("three")]
    both = generate(model, prompts, 6, [tiny_tokenizer.eot_id], params, seeds=[11, 22])
    alone = generate(model, prompts[1:], 6, [tiny_tokenizer.eot_id], params, seeds=[22])
    assert both.tokens[1] == alone.tokens[0]
    assert all(len(t) == len(lp) for t, lp in zip(both.tokens, both.logprobs, strict=True))
