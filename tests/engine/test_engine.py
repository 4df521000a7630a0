"""End-to-end engine behaviour on a tiny model: cached decoding equals recomputation,
batching and preemption change nothing, the prefix cache changes nothing but the work,
and every request ends with usage while the block pool returns whole."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from server.engine.api import (
    ChoiceFinished,
    Delta,
    EngineRequest,
    RequestFinished,
    RequestRejected,
    SamplingParams,
)
from server.engine.offline import generate
from server.engine.output import OutputProcessor
from tests.engine.conftest import collect, reference_greedy, wait_until

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def submit(engine, rid, prompt, params=GREEDY, eos=()):
    request = EngineRequest(request_id=rid, prompt_ids=list(prompt), params=params, eos_token_ids=list(eos))
    stream = engine.submit(request)
    stream.processor = OutputProcessor(request, engine.test_texts, stream.abort_choice)
    return stream


def streamed_text(engine, rid, prompt, params=GREEDY) -> str:
    return collect(submit(engine, rid, prompt, params), prompt, 1).text


def test_greedy_equals_full_recomputation_across_blocks(model, prompts, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=256)
    outs = [collect(submit(engine, f"r{i}", p), p, 1) for i, p in enumerate(prompts)]
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference_greedy(model, p, GREEDY.max_tokens)
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(p) and out.usage.completion_tokens == GREEDY.max_tokens
    engine.blocks.check_whole()


def test_stepping_thread_runs_its_own_thread_count(model, prompts, make_engine, monkeypatch):
    """EngineConfig.threads sizes the stepping thread's OpenMP team only (a server leaves
    a core to its event loop); the output is the same."""
    from server.engine.engine import Engine

    seen: list[int] = []
    step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: (seen.append(torch.get_num_threads()), step(self))[1])
    before = torch.get_num_threads()
    engine = make_engine(model, block_size=4, num_blocks=64, threads=1)
    out = collect(submit(engine, "r0", prompts[0]), prompts[0], 1)
    assert out.token_ids == reference_greedy(model, prompts[0], GREEDY.max_tokens)
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


def test_batched_equals_unbatched_with_joins_and_leaves(model, prompts, make_engine):
    alone = make_engine(model, block_size=4, num_blocks=256, max_num_seqs=1)
    expected = [collect(submit(alone, f"a{i}", p), p, 1).token_ids for i, p in enumerate(prompts)]
    engine = make_engine(model, block_size=4, num_blocks=256, max_num_seqs=8)
    lengths = [24, 5, 17, 9, 24, 3, 12]
    streams = []
    first = submit(engine, "b0", prompts[0], SamplingParams(temperature=0.0, max_tokens=lengths[0]))
    streams.append(first)
    # Wait until the first request is decoding before the others join.
    event = first.get(timeout=30)
    assert isinstance(event, Delta)
    for i, p in enumerate(prompts[1:], start=1):
        streams.append(submit(engine, f"b{i}", p, SamplingParams(temperature=0.0, max_tokens=lengths[i])))
    outs = [collect(s, p, 1) for s, p in zip(streams, prompts, strict=True)]
    outs[0].choices[0].token_ids[:0] = event.token_ids
    for i, out in enumerate(outs):
        assert out.token_ids == expected[i][:lengths[i]], i
    engine.blocks.check_whole()


def test_chunked_prefill_and_preemption_keep_outputs(model, prompts, make_engine):
    # 20 blocks of 4 tokens cannot hold all seven sequences at full length: the newest
    # are preempted and recomputed; 8-token steps split every long prompt into chunks.
    engine = make_engine(model, block_size=4, num_blocks=20, max_num_batched_tokens=8)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    streams = [submit(engine, f"p{i}", p, params) for i, p in enumerate(prompts)]
    outs = [collect(s, p, 1) for s, p in zip(streams, prompts, strict=True)]
    assert engine.stats().preemptions > 0
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference_greedy(model, p, 20)
    engine.blocks.check_whole()


def test_seeded_sampling_same_output_whatever_the_batch(model, prompts, make_engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=20,
                            presence_penalty=0.5, repetition_penalty=1.1)
    alone = make_engine(model, block_size=4, num_blocks=256)
    expected = collect(submit(alone, "x", prompts[1], params), prompts[1], 1).token_ids
    crowded = make_engine(model, block_size=4, num_blocks=24, max_num_batched_tokens=16)
    others = [submit(crowded, f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=20, seed=i))
              for i, p in enumerate(prompts)]
    mine = submit(crowded, "x", prompts[1], params)
    got = collect(mine, prompts[1], 1).token_ids
    for s in others:
        collect(s, [], 1)
    assert got == expected
    unseeded = [collect(submit(alone, f"u{i}", prompts[1], SamplingParams(temperature=1.0, max_tokens=20)),
                        prompts[1], 1).token_ids for i in range(2)]
    assert unseeded[0] != unseeded[1]


def test_prefix_cache_hit_equals_cold_run(model, tiny_tokenizer, make_engine):
    system = tiny_tokenizer.encode("You are a helpful assistant. Answer briefly and truthfully. " * 3)
    a = system + tiny_tokenizer.encode("What is the capital of France?")
    b = system + tiny_tokenizer.encode("Name a colour.")
    cold = make_engine(model, block_size=4, num_blocks=256, enable_prefix_caching=False)
    cold_b = collect(submit(cold, "cold", b), b, 1)
    assert cold_b.usage.cached_tokens == 0
    warm = make_engine(model, block_size=4, num_blocks=256)
    collect(submit(warm, "first", a), a, 1)
    hit = collect(submit(warm, "second", b), b, 1)
    assert hit.token_ids == cold_b.token_ids
    assert hit.usage.cached_tokens >= len(system) - 4
    assert hit.usage.cached_tokens % 4 == 0
    stats = warm.stats()
    assert stats.prefix_cache_hits >= hit.usage.cached_tokens
    assert stats.prefix_cache_queries >= len(a) + len(b)
    # Identical prompt again: everything but the last token comes from the cache.
    again = collect(submit(warm, "third", b), b, 1)
    assert again.token_ids == cold_b.token_ids
    assert again.usage.cached_tokens == (len(b) - 1) // 4 * 4
    warm.blocks.check_whole()


def test_n_choices_share_the_prompt_blocks(model, tiny_tokenizer, make_engine):
    prompt = tiny_tokenizer.encode("Tell me a story about a dragon who learned to read books")
    engine = make_engine(model, block_size=4, num_blocks=256)
    params = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=10)
    out = collect(submit(engine, "n3", prompt, params), prompt, 3)
    assert len({tuple(c.token_ids) for c in out.choices}) > 1
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 30
    # Choices 1 and 2 found the prompt's full blocks computed by choice 0.
    assert engine.stats().prefix_cache_hits >= 2 * ((len(prompt) - 1) // 4 * 4)
    again = collect(submit(engine, "n3b", prompt, params), prompt, 3)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in out.choices]
    engine.blocks.check_whole()


def test_greedy_matches_transformers_generate(model, prompts, tiny_tokenizer, make_engine):
    transformers = pytest.importorskip("transformers")
    from gpt.hf import hf_config, to_hf_state

    cfg = hf_config(model.config, tiny_tokenizer)
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    max_tokens = 16
    outs = generate(make_engine(model), prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    for p, out in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, len(p):].tolist()


def test_stop_strings_tokens_eos_and_min_tokens(model, prompts, tiny_tokenizer, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=256)
    p = prompts[0]
    base = collect(submit(engine, "base", p), p, 1)
    text = streamed_text(engine, "base-text", p)
    # A stop string made of the end of one token and the start of the next.
    pieces = [tiny_tokenizer.decode([t]) for t in base.token_ids]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) > 1 and len(pieces[i + 1]) > 1)
    stop = pieces[k][-1] + pieces[k + 1][:1]
    cut = text.find(stop)
    stopped = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])
    out = collect(submit(engine, "stop", p, stopped), p, 1)
    assert out.choices[0].finish_reason == "stop"
    out_text = streamed_text(engine, "stop-text", p, stopped)
    assert out_text == text[:cut] and stop not in out_text
    # A stop token ends the choice at its first occurrence; its text is not output.
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    by_token = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[tok])
    out = collect(submit(engine, "tok", p, by_token), p, 1)
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.choices[0].finish_reason == "stop"
    assert streamed_text(engine, "tok-text", p, by_token) == tiny_tokenizer.decode(base.token_ids[:first])
    # eos behaves the same, ignore_eos runs to max_tokens, min_tokens forbids it early.
    out = collect(submit(engine, "eos", p, SamplingParams(temperature=0.0, max_tokens=24), eos=[tok]), p, 1)
    assert out.token_ids == base.token_ids[:first + 1]
    out = collect(submit(engine, "ign", p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                         eos=[tok]), p, 1)
    assert out.token_ids == base.token_ids
    out = collect(submit(engine, "min", p, SamplingParams(temperature=0.0, max_tokens=24, min_tokens=first + 2),
                         eos=[tok]), p, 1)
    assert tok not in out.token_ids[:first + 2]
    assert len(out.token_ids) >= first + 2
    engine.blocks.check_whole()


def test_logprobs_are_those_of_the_model(model, prompts, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=256)
    p = prompts[4]
    stream = submit(engine, "lp", p, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))
    events = list(stream)
    deltas = [e for e in events if isinstance(e, Delta)]
    ids = list(p)
    for d in deltas:
        (lp,) = d.logprobs
        with torch.inference_mode():
            ref = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
        assert lp.token_id == d.token_ids[0] == int(ref.argmax())
        assert abs(lp.logprob - float(ref.max())) < 1e-4
        assert [t.token_id for t in lp.top] == ref.topk(3).indices.tolist()
        ids.append(d.token_ids[0])


def test_requests_that_can_never_fit_are_refused_at_submit(model, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=10)
    ctx = model.config.max_seq_len
    with pytest.raises(RequestRejected, match="context"):
        submit(engine, "long", [1] * (ctx - 5), SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="KV cache"):
        submit(engine, "big", [1] * 30, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        submit(engine, "empty", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        submit(engine, "oov", [10**6], SamplingParams())
    # The engine still serves after refusals.
    out = collect(submit(engine, "ok", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3)), [1, 2, 3], 1)
    assert len(out.token_ids) == 3


def test_abort_frees_blocks_and_ends_the_stream(model, prompts, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=256)
    stream = submit(engine, "long", prompts[3], SamplingParams(temperature=1.0, max_tokens=200, ignore_eos=True))
    assert isinstance(stream.get(timeout=30), Delta)
    assert engine.stats().kv_blocks_used > 0
    stream.abort()
    events = list(stream)
    assert isinstance(events[-1], RequestFinished)
    finished = [e for e in events if isinstance(e, ChoiceFinished)]
    assert [e.finish_reason for e in finished] == ["abort"]
    assert 1 <= events[-1].usage.completion_tokens < 200
    wait_until(lambda: engine.stats().kv_blocks_used == 0, what="blocks freed")
    engine.blocks.check_whole()


def test_async_iteration_from_an_event_loop(model, prompts, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=256)

    async def consume(rid, prompt):
        events = []
        async for event in submit(engine, rid, prompt, SamplingParams(temperature=0.0, max_tokens=8)):
            events.append(event)
        return events

    async def main():
        return await asyncio.gather(*(consume(f"a{i}", p) for i, p in enumerate(prompts[:4])))

    results = asyncio.run(main())
    for p, events in zip(prompts[:4], results, strict=True):
        assert isinstance(events[-1], RequestFinished)
        tokens = [t for e in events if isinstance(e, Delta) for t in e.token_ids]
        assert tokens == reference_greedy(engine.model, p, 8)


def test_burst_of_500_requests_with_aborts_leaves_the_pool_whole(model, prompts, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=40, max_num_seqs=32, max_num_batched_tokens=64)
    rng = random.Random(0)
    streams = []
    for i in range(500):
        p = rng.choice(prompts)[: rng.randint(1, 20)]
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.8, 1.2]), top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]),
            max_tokens=rng.randint(1, 12), n=rng.choice([1, 1, 1, 2]), seed=rng.choice([None, i]),
            stop=rng.choice([[], ["e"]]), logprobs=rng.choice([0, 2]))
        streams.append(submit(engine, f"burst{i}", p, params))
        if rng.random() < 0.2:
            victim = rng.choice(streams)
            victim.abort()
    reasons = []
    for s in streams:
        events = list(s)
        assert isinstance(events[-1], RequestFinished)
        assert sum(isinstance(e, RequestFinished) for e in events) == 1
        reasons += [e.finish_reason for e in events if isinstance(e, ChoiceFinished)]
    assert "abort" in reasons and "length" in reasons
    wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, what="engine idle")
    engine.blocks.check_whole()
    assert engine.stats().kv_blocks_used == 0
    assert engine.stats().preemptions > 0       # the pool was tight enough to exercise preemption


def test_full_queue_raises_overloaded_and_engine_leaves_callers_model_alone(model, tiny_tokenizer):
    from server.engine.api import EngineOverloaded
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.output import TokenTexts

    engine = Engine(model, EngineConfig(device="cpu", dtype=torch.float32, num_blocks=64, max_waiting=2),
                    start=False)
    engine.test_texts = TokenTexts(tiny_tokenizer.decode_bytes)
    submit(engine, "q1", [1, 2])
    submit(engine, "q2", [1, 2])
    with pytest.raises(EngineOverloaded):
        submit(engine, "q3", [1, 2])
    with pytest.raises(ValueError, match="already in flight"):
        submit(engine, "q1", [1, 2])
    engine.start()
    engine.shutdown()
    # A different dtype converts a copy, never the caller's model.
    half = Engine(model, EngineConfig(device="cpu", dtype=torch.bfloat16, num_blocks=64))
    half.test_texts = engine.test_texts
    try:
        assert next(model.parameters()).dtype == torch.float32
        assert next(half.model.parameters()).dtype == torch.bfloat16
        out = collect(submit(half, "bf16", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4)), [1, 2, 3], 1)
        assert len(out.token_ids) == 4
    finally:
        half.shutdown()


def test_submit_many_is_seen_whole_by_the_first_step_and_is_all_or_none(model, prompts, tiny_tokenizer):
    from server.engine.api import EngineOverloaded, RequestRejected
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine

    def requests(prefix, ps, params=GREEDY):
        return [EngineRequest(f"{prefix}{i}", list(p), params) for i, p in enumerate(ps)]

    engine = Engine(model, EngineConfig(device="cpu", dtype=torch.float32, num_blocks=64, max_waiting=4),
                    start=False)
    seen: list[int] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda batch, *rest: (seen.append(len(batch)), execute(batch, *rest))[1]
    # Refused whole: one prompt beyond the context, a repeated id, more than the queue takes.
    too_long = EngineRequest("long", [1] * (model.config.max_seq_len + 1), GREEDY)
    with pytest.raises(RequestRejected):
        engine.submit_many([*requests("a", prompts[:2]), too_long])
    with pytest.raises(ValueError, match="differ"):
        engine.submit_many([*requests("b", prompts[:1]), *requests("b", prompts[1:2])])
    with pytest.raises(EngineOverloaded):
        engine.submit_many(requests("c", [prompts[0]] * 5))
    assert engine.stats().waiting == 0 and not engine._inbox
    # Accepted whole: a running engine's first step holds every prompt, even when checking
    # each one takes a while (one by one, the engine would step with the first alone).
    engine.start()
    check = engine._check
    engine._check = lambda request: (time.sleep(0.05), check(request))[1]
    streams = engine.submit_many(requests("d", prompts[:4]))
    try:
        outs = [[t for event in s if isinstance(event, Delta) for t in event.token_ids] for s in streams]
        assert seen[0] == 4
        assert outs == [reference_greedy(model, p, GREEDY.max_tokens) for p in prompts[:4]]
    finally:
        engine.shutdown()


def test_a_failing_step_aborts_in_flight_requests_and_the_engine_keeps_serving(model, prompts, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=64)
    real = engine.runner.execute
    calls = {"n": 0}

    def flaky(batch, *rest):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real(batch, *rest)

    engine.runner.execute = flaky
    events = list(submit(engine, "doomed", prompts[0]))
    assert [e.finish_reason for e in events if isinstance(e, ChoiceFinished)] == ["abort"]
    assert isinstance(events[-1], RequestFinished)
    engine.blocks.check_whole()
    out = collect(submit(engine, "fine", prompts[0]), prompts[0], 1)
    assert out.token_ids == reference_greedy(model, prompts[0], GREEDY.max_tokens)


def test_offline_generate_threaded_and_synchronous_agree(model, tiny_tokenizer, make_engine):
    from gpt.chat import chat_prompt_ids, chat_stop_ids
    from server.engine.config import EngineConfig
    from server.engine.offline import build_engine

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    prompts = [tiny_tokenizer.encode("Hello there"), [5, 6, 7], chat_prompt_ids(tiny_tokenizer, chat)]
    stops = chat_stop_ids(tiny_tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outs = generate(make_engine(model), prompts, params, stops)
    sync = build_engine(model, EngineConfig(device="cpu", dtype=torch.float32), start=False)
    assert sync.thread is None
    assert [o.token_ids for o in generate(sync, prompts, params, stops)] == [o.token_ids for o in outs]
    assert [o.prompt_ids for o in outs] == prompts
    for p, out in zip(prompts, outs, strict=True):
        ref = reference_greedy(model, p, 6)
        cut = next((i + 1 for i, t in enumerate(ref) if t in stops), len(ref))
        assert out.token_ids == ref[:cut]
        assert out.choices[0].finish_reason == ("stop" if cut < len(ref) or ref[-1] in stops else "length")
    assert all(o.usage.completion_tokens == len(o.token_ids) for o in outs)
    sync.blocks.check_whole()


def test_backpressure_pauses_a_request_its_reader_does_not_read(model, prompts, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=256)
    p = prompts[0]
    expected = reference_greedy(model, p, 40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    request = EngineRequest(request_id="slow", prompt_ids=list(p), params=params, max_buffered_tokens=8)
    stream = engine.submit(request)
    wait_until(lambda: engine.stats().paused == 1, what="the unread request to pause")
    state = engine._requests["slow"]
    assert state.sequences[0].num_output_tokens == 8          # the bound, not the 40 asked
    assert engine.stats().running == 0 and engine.stats().kv_blocks_used > 0
    # Reading down to the low-water mark resumes it; read everything and the output is
    # the same as without a pause.
    tokens = []
    for event in stream:
        if isinstance(event, Delta):
            tokens += event.token_ids
    assert tokens == expected
    engine.blocks.check_whole()


def test_a_paused_request_gives_its_blocks_up_after_the_grace_and_recomputes(model, prompts, make_engine):
    engine = make_engine(model, block_size=4, num_blocks=256, pause_grace_s=0.0)
    p = prompts[3]
    expected = reference_greedy(model, p, 30)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    stream = engine.submit(EngineRequest(request_id="idle", prompt_ids=list(p), params=params,
                                         max_buffered_tokens=4))
    wait_until(lambda: engine.stats().paused == 1, what="pause")
    # Another request's step releases the paused sequence's blocks (grace 0).
    other = submit(engine, "other", prompts[1], SamplingParams(temperature=0.0, max_tokens=3))
    collect(other, prompts[1], 1)
    wait_until(lambda: not engine._requests["idle"].sequences[0].block_table, what="blocks released")
    tokens = [t for e in stream if isinstance(e, Delta) for t in e.token_ids]
    assert tokens == expected
    assert engine.stats().preemptions >= 1
    engine.blocks.check_whole()
