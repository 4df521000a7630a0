"""Pretraining: next-token prediction on windows of one token stream (the local corpus
interleaved with plain-text renderings of training-split tasks)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gpt.tokenizer import SolTokenizer
from training.batching import step_generator
from training.loop import LoopConfig


@dataclass
class PretrainConfig:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=3e-3, warmup_steps=20))
    seq_len: int = 128


def token_stream(tokenizer: SolTokenizer, documents: list[str], seed: int) -> torch.Tensor:
    """Documents shuffled (by seed) and joined, each opened by the end-of-sequence token
    (<|endoftext|> for sol's own tokenizer)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    encoded = tokenizer.encode_batch([documents[i] for i in order])
    ids: list[int] = []
    for doc in encoded:
        ids.append(tokenizer.eos_ids[0])
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


class PretrainStage:
    name = "pretrain"

    def __init__(self, tokens: torch.Tensor, cfg: PretrainConfig, device: torch.device | str = "cpu") -> None:
        if tokens.numel() <= cfg.seq_len + 1:
            raise ValueError(f"token stream of {tokens.numel()} tokens is shorter than one window")
        self.tokens = tokens
        self.cfg = cfg
        self.device = torch.device(device)

    def micro_batch(self, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
        n, b = self.cfg.seq_len + 1, self.cfg.loop.batch_size
        g = step_generator(self.cfg.loop.seed, step, micro)
        starts = torch.randint(0, self.tokens.numel() - n, (b * world,), generator=g)[rank * b:(rank + 1) * b]
        windows = self.tokens[starts[:, None] + torch.arange(n)[None, :]]
        return windows.to(self.device)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        return loss, {"loss": loss.item(), "tokens": float(batch[:, 1:].numel())}
