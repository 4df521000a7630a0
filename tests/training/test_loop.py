"""The shared loop: the loss falls, the schedule, and resume equality."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import make_tiny_model
from training.loop import LoopConfig, lr_at, train
from training.stages.pretrain import PretrainConfig, PretrainStage, token_stream


def _stage(tokenizer, corpus, steps: int, **loop) -> PretrainStage:
    tokens = token_stream(tokenizer, corpus.train[:200], seed=0)
    cfg = PretrainConfig(LoopConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, log_every=5, **loop),
                         seq_len=64)
    return PretrainStage(tokens, cfg)


def test_pretraining_loss_falls_on_tiny(tiny_tokenizer, corpus, tmp_path):
    model = make_tiny_model(tiny_tokenizer)
    stage = _stage(tiny_tokenizer, corpus, steps=40)
    with torch.no_grad():
        initial, _ = stage.loss(model, stage.micro_batch(0, 0, 0, 1))
    result = train(model, stage, stage.cfg.loop, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < initial.item() - 0.7 and losses[-1] < losses[0], (initial.item(), losses)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and '"tokens_per_s"' in lines[-1]


def test_warmup_then_cosine_schedule():
    cfg = LoopConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == 0.1 and lr_at(cfg, 9) == 1.0
    assert abs(lr_at(cfg, 60) - 0.55) < 1e-9          # half way: floor + (1 - floor) / 2
    assert abs(lr_at(cfg, 109) - 0.1) < 1e-3


def test_resume_gives_the_same_weights_as_one_run(tiny_tokenizer, corpus, tmp_path):
    straight = make_tiny_model(tiny_tokenizer)
    stage = _stage(tiny_tokenizer, corpus, steps=12, grad_accum=2)
    train(straight, stage, stage.cfg.loop, tmp_path / "straight", progress=False)

    first = make_tiny_model(tiny_tokenizer)
    half = dataclasses.replace(stage.cfg.loop, steps=12)
    # Stop after 6 of 12 steps: same schedule, state saved at step 6.
    stopping = _StopAfter(stage, 6)
    with pytest.raises(_Stop):
        train(first, stopping, dataclasses.replace(half, save_every=6), tmp_path / "resumed", progress=False)
    resumed = make_tiny_model(tiny_tokenizer, seed=123)         # different init: all must come from state
    result = train(resumed, stage, half, tmp_path / "resumed", progress=False)
    assert result.step == 12
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


class _Stop(Exception):
    pass


class _StopAfter:
    """Wraps a stage and interrupts the run when step `n` (0-based) is requested."""

    name = "pretrain"

    def __init__(self, stage, n: int) -> None:
        self.stage, self.n = stage, n

    def micro_batch(self, step, micro, rank, world):
        if step == self.n:
            raise _Stop
        return self.stage.micro_batch(step, micro, rank, world)

    def loss(self, model, batch):
        return self.stage.loss(model, batch)
