"""Structured outputs under bounded work: grammar bombs are refused at compile naming
the limit they are past, quickly and without keeping their memory; the compile cache
is bounded by bytes; a mask that runs out of its step limits ends its own request with
that error while the rows beside it go on."""

from __future__ import annotations

import time

import pytest

from server.engine.api import EngineRequest, RequestFinished, ResponseFormat, SamplingParams
from server.engine.grammar import GrammarCompiler, GrammarError, GrammarLimits, _heap_in_use
from server.engine.output import OutputProcessor

BOMBS = ["a{9000000}", "(a{1001}){1000}", "a{100000}"]
# Fine at every step with the default limits; its Earley items grow with every "a", so
# with 100 items a step it runs out after some tens of tokens.
AMBIGUOUS = 'start: y\ny: "a" | y y'


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer) -> GrammarCompiler:
    return GrammarCompiler.for_tokenizer(tiny_tokenizer)


@pytest.mark.parametrize("regex", BOMBS)
def test_bomb_is_refused_at_compile_naming_the_limit(compiler, regex):
    before, started = _heap_in_use(), time.monotonic()
    with pytest.raises(GrammarError) as err:
        compiler.compile(ResponseFormat("regex", regex=regex))
    # Without limits the first mask alone took 1-7 s and kept 90-180 MB (2-core machine).
    assert time.monotonic() - started < 3.0
    assert "initial_lexer_fuel=" in str(err.value) and "simplify" in str(err.value)
    assert "<non-verbose/>" not in str(err.value)
    if before is not None:
        assert _heap_in_use() - before < 32 << 20
    assert compiler.cached(ResponseFormat("regex", regex=regex)) is None


def test_cache_is_bounded_by_bytes_not_entries(tiny_tokenizer):
    # a{20000} passes the limits and keeps ~10 MB of lexer state: a 24 MiB cache holds two.
    limits = GrammarLimits(cache_bytes=24 << 20)
    small = GrammarCompiler.for_tokenizer(tiny_tokenizer, limits=limits)
    fmts = [ResponseFormat("regex", regex=f"a{{{20000 + i}}}") for i in range(4)]
    compiled = [small.compile(f) for f in fmts]
    assert all(c.nbytes > 1 << 20 for c in compiled), [c.nbytes for c in compiled]
    assert small.cache_bytes <= limits.cache_bytes
    assert len(small) < len(fmts)
    assert small.cached(fmts[-1]) is compiled[-1]           # the newest stays, the oldest left
    assert small.cached(fmts[0]) is None


def test_entry_bigger_than_the_cache_is_served_not_kept(tiny_tokenizer):
    small = GrammarCompiler.for_tokenizer(tiny_tokenizer, limits=GrammarLimits(cache_bytes=1 << 20))
    fmt = ResponseFormat("regex", regex="a{20000}")
    assert small.compile(fmt) is not None
    assert small.cached(fmt) is None and small.cache_bytes == 0


def _submit(engine, rid, prompt, params, grammar):
    request = EngineRequest(request_id=rid, prompt_ids=list(prompt), params=params, grammar=grammar)
    stream = engine.submit(request)
    processor = OutputProcessor(request, engine.test_texts, stream.abort_choice)

    def finished() -> tuple[RequestFinished, list[str]]:
        reasons, end = [], None
        for raw in stream:
            for event in processor.process([raw]):
                if isinstance(event, RequestFinished):
                    end = event
                elif hasattr(event, "finish_reason"):
                    reasons.append(event.finish_reason)
        assert end is not None
        return end, reasons
    return finished


def test_mask_past_its_step_limit_fails_only_its_request(model, prompts, make_engine, tiny_tokenizer):
    tight = GrammarCompiler.for_tokenizer(tiny_tokenizer, limits=GrammarLimits(step_max_items=100))
    grammar = tight.compile(ResponseFormat("grammar", grammar=AMBIGUOUS))
    engine = make_engine(model, max_num_seqs=8)
    bomb = _submit(engine, "bomb", prompts[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
                   grammar)
    free = [_submit(engine, f"free{i}", p, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True), None)
            for i, p in enumerate(prompts[1:4])]
    end, reasons = bomb()
    assert "Too many items" in end.error and "step_max_items=100" in end.error, end.error
    assert reasons == ["abort"] and 0 < end.usage.completion_tokens < 200
    for wait in free:
        other, other_reasons = wait()
        assert other.error == "" and other_reasons == ["length"] and other.usage.completion_tokens == 60
