"""The output processor: turns one request's token events from the engine core into what
a client reads (text deltas, stop strings, log-prob text, usage), on the reader's thread.

The engine core decides the finishes that token ids settle (stop tokens, lengths). Stop
strings need text, so they are found here: the choice's text is cut before the stop
string, the choice finishes with "stop", and the engine is told to stop generating it.
Tokens the engine made after that (it steps on while the abort reaches it) are dropped,
and the usage counts the tokens the output kept, up to and including the one that
completed the stop string, the same as if the engine had stopped there itself.

Running it beside the reader (the service's event loop, or training) keeps the step loop
free of per-token string work: the engine core needs no tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.api import (
    ChoiceFinished,
    Delta,
    EngineRequest,
    Event,
    OutputEvent,
    RequestFinished,
    TextDelta,
    Usage,
    stop_token_ids,
)
from server.engine.detokenizer import IncrementalDetokenizer


class TokenTexts:
    """Each token's bytes and text, cached: one per model, shared by its requests."""

    def __init__(self, decode_bytes: Callable[[list[int]], bytes]) -> None:
        self._decode_bytes = decode_bytes
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._decode_bytes([token_id])
        return b

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


@dataclass
class _Choice:
    detok: IncrementalDetokenizer
    tokens: int = 0                  # tokens kept in the output (and billed)
    finished: bool = False
    pending: TextDelta | None = field(default=None, repr=False)   # this batch's delta


class OutputProcessor:
    def __init__(self, request: EngineRequest, texts: TokenTexts, abort_choice: Callable[[int], None]) -> None:
        self.request_id = request.request_id
        self.params = request.params
        self.stop_ids = stop_token_ids(request)
        self.texts = texts
        self.abort_choice = abort_choice
        self.choices = [_Choice(IncrementalDetokenizer(texts.bytes, self.params.stop))
                        for _ in range(self.params.n)]

    def process(self, events: list[Event]) -> list[OutputEvent]:
        """Output events for a batch of engine events: at most one TextDelta per choice,
        its finish after it, and the request's end (with the kept usage) last."""
        out: list[OutputEvent] = []
        for choice in self.choices:
            choice.pending = None
        for event in events:
            if isinstance(event, Delta):
                self._tokens(event, out)
            elif isinstance(event, ChoiceFinished):
                choice = self.choices[event.index]
                if not choice.finished:
                    choice.finished = True
                    self._delta(event.index, out).text += choice.detok.flush()
                    out.append(event)
            elif isinstance(event, RequestFinished):
                usage = Usage(prompt_tokens=event.usage.prompt_tokens,
                              completion_tokens=sum(c.tokens for c in self.choices),
                              cached_tokens=event.usage.cached_tokens)
                out.append(RequestFinished(event.request_id, usage, event.timings, event.error))
        return [e for e in out if not isinstance(e, TextDelta) or e.token_ids or e.text]

    def _delta(self, index: int, out: list[OutputEvent]) -> TextDelta:
        choice = self.choices[index]
        if choice.pending is None:
            choice.pending = TextDelta(self.request_id, index, [], "")
            out.append(choice.pending)
        return choice.pending

    def _tokens(self, event: Delta, out: list[OutputEvent]) -> None:
        choice = self.choices[event.index]
        if choice.finished:
            return          # generated after a stop string, before the abort landed
        delta = self._delta(event.index, out)
        logprobs = event.logprobs or [None] * len(event.token_ids)
        for token, lp in zip(event.token_ids, logprobs, strict=True):
            choice.tokens += 1
            delta.token_ids.append(token)
            if lp is not None:
                lp.text = self.texts.text(lp.token_id)
                for alt in lp.top:
                    alt.text = self.texts.text(alt.token_id)
                delta.logprobs.append(lp)
            delta.text += choice.detok.add(token, hide=token in self.stop_ids,
                                           check_stop=choice.tokens >= self.params.min_tokens)
            if choice.detok.stopped:
                choice.finished = True
                delta.text += choice.detok.flush()
                out.append(ChoiceFinished(self.request_id, event.index, "stop"))
                self.abort_choice(event.index)
                return
