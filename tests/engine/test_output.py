"""The output processor: text from token events, stop strings found across tokens (the
choice finishes, the engine is told, later tokens are dropped and not billed), stop
tokens hidden, log-prob text filled in."""

from __future__ import annotations

from server.engine.api import (
    ChoiceFinished,
    Delta,
    EngineRequest,
    RequestFinished,
    RequestTimings,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.engine.output import OutputProcessor, TokenTexts

PIECES = [b"Hel", b"lo", b" wo", b"rld", b"ST", b"OP", b" more", b"<end>"]
END = 7
TEXTS = TokenTexts(lambda ids: b"".join(PIECES[i] for i in ids))


def processor(aborted: list[int], n: int = 1, **params) -> OutputProcessor:
    request = EngineRequest("r", [0], SamplingParams(n=n, **params), eos_token_ids=[END])
    return OutputProcessor(request, TEXTS, aborted.append)


def finished(completion: int) -> RequestFinished:
    return RequestFinished("r", Usage(prompt_tokens=1, completion_tokens=completion), RequestTimings(0.0))


def text_of(events, index: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.index == index)


def test_stop_string_across_tokens_finishes_the_choice_and_drops_later_tokens():
    aborted: list[int] = []
    p = processor(aborted, stop=["STOP"])
    out = p.process([Delta("r", 0, [0]), Delta("r", 0, [1]), Delta("r", 0, [4])])
    assert text_of(out) == "Hello"              # "ST" held back: it may begin the stop string
    out += p.process([Delta("r", 0, [5])])
    assert aborted == [0]
    assert [e.finish_reason for e in out if isinstance(e, ChoiceFinished)] == ["stop"]
    # The engine made two more tokens before the abort landed, then ended the choice.
    late = p.process([Delta("r", 0, [6]), Delta("r", 0, [6]), ChoiceFinished("r", 0, "abort"), finished(6)])
    assert text_of(out + late) == "Hello"
    assert not [e for e in late if isinstance(e, ChoiceFinished)]
    assert late[-1].usage.completion_tokens == 4    # up to the token that completed "STOP"


def test_stop_token_text_is_hidden_and_held_text_is_flushed_at_the_end():
    p = processor([], stop=["zzz"])
    out = p.process([Delta("r", 0, [0]), Delta("r", 0, [END]), ChoiceFinished("r", 0, "stop"), finished(2)])
    assert text_of(out) == "Hel"
    assert out[-1].usage.completion_tokens == 2
    deltas = [e for e in out if isinstance(e, TextDelta)]
    assert len(deltas) == 1 and deltas[0].token_ids == [0, END]   # one delta per choice per batch


def test_stop_strings_wait_for_min_tokens():
    aborted: list[int] = []
    p = processor(aborted, stop=["lo"], min_tokens=3)
    out = p.process([Delta("r", 0, [0]), Delta("r", 0, [1]), Delta("r", 0, [0]), Delta("r", 0, [1])])
    assert aborted == [0]
    assert text_of(out) == "HelloHel"


def test_choices_are_independent_and_logprob_text_is_filled():
    aborted: list[int] = []
    p = processor(aborted, n=2, stop=["rld"])
    lp = TokenLogprob(2, -0.5, [TopLogprob(2, -0.5), TopLogprob(3, -1.0)])
    out = p.process([Delta("r", 0, [2], [lp]), Delta("r", 1, [2]), Delta("r", 1, [3])])
    assert aborted == [1]
    assert text_of(out, 0) == " wo" and text_of(out, 1) == " wo"
    delta0 = next(e for e in out if isinstance(e, TextDelta) and e.index == 0)
    assert delta0.logprobs[0].text == " wo" and [t.text for t in delta0.logprobs[0].top] == [" wo", "rld"]
    out = p.process([Delta("r", 0, [6]), ChoiceFinished("r", 0, "length"), ChoiceFinished("r", 1, "abort"),
                     finished(4)])
    assert text_of(out, 0) == " more"
    assert [(e.index, e.finish_reason) for e in out if isinstance(e, ChoiceFinished)] == [(0, "length")]
    assert out[-1].usage.completion_tokens == 4
