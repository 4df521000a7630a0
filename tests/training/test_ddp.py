"""Two gloo processes with batch B match one process with batch 2B."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from gpt.config import preset
from gpt.model import GPT
from tests.conftest import free_port
from training.distributed import setup, teardown
from training.loop import LoopConfig, train
from training.stages.pretrain import PretrainConfig, PretrainStage

STEPS = 4


def _model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny").replace(vocab_size=vocab))


def _cfg(batch: int) -> PretrainConfig:
    return PretrainConfig(LoopConfig(steps=STEPS, batch_size=batch, lr=1e-3, warmup_steps=1, log_every=2), seq_len=32)


def _worker(rank: int, world: int, port: int, tokens: torch.Tensor, vocab: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), SOL_DEVICE="cpu")
    torch.set_num_threads(1)
    info = setup()
    model = _model(vocab)
    stage = PretrainStage(tokens, _cfg(4), "cpu")
    result = train(model, stage, stage.cfg.loop, info=info, progress=False)
    if rank == 0:
        torch.save({"state": model.state_dict(), "loss": result.history[-1]["loss"]}, out)
    teardown()


def test_two_process_ddp_matches_single_process_with_doubled_batch(tmp_path):
    vocab = 300
    tokens = torch.randint(0, vocab, (5000,), generator=torch.Generator().manual_seed(0))
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, free_port(), tokens, vocab, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    single = _model(vocab)
    stage = PretrainStage(tokens, _cfg(8), "cpu")
    result = train(single, stage, stage.cfg.loop, progress=False)
    for name, tensor in single.state_dict().items():
        assert torch.allclose(tensor, ddp["state"][name], atol=2e-5), name
    assert abs(result.history[-1]["loss"] - ddp["loss"]) < 1e-4
