"""Engine test helpers: a tiny model with livelier weights (random init at std 0.02
repeats one token forever, which would make token-for-token comparisons weak), a
full-recomputation greedy reference, and engines that are always shut down."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from server.engine.api import ChoiceFinished, RequestFinished, TextDelta, Usage
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.output import TokenTexts
from tests.conftest import make_tiny_model


def lively(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


@pytest.fixture
def model(tiny_tokenizer):
    return lively(make_tiny_model(tiny_tokenizer, seed=0))


@pytest.fixture
def prompts(tiny_tokenizer) -> list[list[int]]:
    texts = [
        "The quick brown fox jumps over",
        "Once upon a time",
        "a",
        "In the beginning there was nothing but a long and winding road that led to the sea, and",
        "What is 12 plus 30?",
        "Hello",
        "The cat sat on the mat and looked at the bird outside the window",
    ]
    return [tiny_tokenizer.encode(t) for t in texts]


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every token: no cache at all."""
    ids = torch.tensor([prompt])
    for _ in range(max_tokens):
        nxt = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture
def make_engine(tiny_tokenizer) -> Callable[..., Engine]:
    engines: list[Engine] = []

    def factory(model, **config) -> Engine:
        config.setdefault("device", "cpu")
        config.setdefault("dtype", torch.float32)
        engine = Engine(model, EngineConfig(**config))
        # The tests read text through an output processor, as the service does.
        engine.test_texts = TokenTexts(tiny_tokenizer.decode_bytes)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.shutdown()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@dataclass
class SeenChoice:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class Seen:
    """A request's output as a client of the service sees it: after the output processor."""

    choices: list[SeenChoice]
    usage: Usage

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def text(self) -> str:
        return self.choices[0].text


def collect(stream, prompt, n) -> Seen:
    seen = Seen([SeenChoice() for _ in range(n)], Usage())
    for raw in stream:
        for event in stream.processor.process([raw]):
            if isinstance(event, TextDelta):
                seen.choices[event.index].token_ids += event.token_ids
                seen.choices[event.index].text += event.text
            elif isinstance(event, ChoiceFinished):
                seen.choices[event.index].finish_reason = event.finish_reason
            elif isinstance(event, RequestFinished):
                seen.usage = event.usage
    return seen
