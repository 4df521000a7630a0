"""Supervised fine-tuning: conversations through the chat template, loss on the
assistant tokens only (the template's mask; everything else is IGNORE_INDEX)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gpt.chat import render_chat
from gpt.tokenizer import SolTokenizer
from training.batching import IGNORE_INDEX, global_indices, pad_right, rank_weight
from training.loop import LoopConfig


@dataclass
class SFTConfig:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=1e-3, warmup_steps=10, batch_size=32))


def sft_example(tokenizer: SolTokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(inputs, targets): targets are the next tokens where the template's mask is 1."""
    chat = render_chat(tokenizer, messages)
    targets = [t if m else IGNORE_INDEX for t, m in zip(chat.ids[1:], chat.mask[1:], strict=True)]
    return chat.ids[:-1], targets


def assistant_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


class SFTStage:
    name = "sft"

    def __init__(self, tokenizer: SolTokenizer, conversations: list[list[dict[str, str]]], cfg: SFTConfig,
                 device: torch.device | str = "cpu",
                 examples: list[tuple[list[int], list[int]]] | None = None) -> None:
        """`examples`: (inputs, targets) already encoded (a user's file, with its weights
        and the long-row rule applied) instead of `conversations`."""
        self.examples = examples if examples is not None else [sft_example(tokenizer, c) for c in conversations]
        if not self.examples:
            raise ValueError("SFT needs at least one conversation")
        self.cfg = cfg
        self.pad = tokenizer.pad_id
        self.device = torch.device(device)
        self._trained: list[int] | None = None

    def micro_batch(self, step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        every = [global_indices(len(self.examples), self.cfg.loop.batch_size, world, self.cfg.loop.seed, step,
                                micro, r) for r in range(world)]
        picks = every[rank]
        inputs = pad_right([self.examples[i][0] for i in picks], self.pad)
        targets = pad_right([self.examples[i][1] for i in picks], IGNORE_INDEX)
        # Ranks hold different numbers of trained tokens: weight this rank's mean so that
        # DDP's average is the mean over the whole global batch's tokens.
        counts = [sum(self.trained[i] for i in rank_picks) for rank_picks in every]
        return inputs.to(self.device), targets.to(self.device), rank_weight(counts, rank)

    @property
    def trained(self) -> list[int]:
        """Trained tokens per example (targets that are not IGNORE_INDEX)."""
        if self._trained is None:
            self._trained = [sum(t != IGNORE_INDEX for t in targets) for _, targets in self.examples]
        return self._trained

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, float]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets, weight = batch
        loss = assistant_lm_loss(model(inputs), targets) * weight
        return loss, {"loss": loss.item(), "tokens": float(inputs.numel())}
