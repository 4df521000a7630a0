"""One LoRA adapter being trained over a frozen base model.

`LoraModel` wraps a GPT: the base's weights are frozen (requires_grad False, so the
optimizer holds no state for them and they stay bit-identical), and the adapter's A and
B are the only parameters that learn. The forward pass is the serving path's own: a
one-slot `LoraStack` over the parameters themselves (gpt/lora_batch.py), every token on
slot 0, so the deltas trained are exactly the deltas served. `model.base` is the base
alone on the same weights (DPO's reference, the RL KL's reference): no second copy of
the model (GPT has no train-mode behaviour, so a stage putting its reference in eval
mode changes nothing for the adapter).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gpt.lora import LoraAdapter, LoraSpec
from gpt.lora_batch import LoraBatch, LoraStack
from gpt.model import GPT, AttentionHook


def _key(layer: int, target: str) -> str:
    return f"l{layer}_{target}"        # ParameterDict keys cannot hold dots


class LoraModel(nn.Module):
    def __init__(self, base: GPT, spec: LoraSpec, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {dropout})")
        self.base = base.requires_grad_(False)
        self.spec = spec
        self.dropout = dropout
        self.enabled = True
        self.version = 0           # bumped each time its weights go to an engine (RL rollouts)
        device = next(base.parameters()).device
        # A random, B zero (as PEFT initialises): training starts from the base's outputs.
        fresh = LoraAdapter.zeros_like(spec, base.config, torch.float32, seed=seed)
        self.lora_a = nn.ParameterDict({_key(*k): nn.Parameter(a.to(device)) for k, (a, _) in fresh.weights.items()})
        self.lora_b = nn.ParameterDict({_key(*k): nn.Parameter(b.to(device)) for k, (_, b) in fresh.weights.items()})
        self._keys = list(fresh.weights)

    @property
    def config(self):
        return self.base.config

    @property
    def lm_head(self) -> nn.Module:
        return self.base.lm_head

    def live_adapter(self) -> LoraAdapter:
        """The adapter over the parameters themselves (gradients flow through it)."""
        return LoraAdapter(self.spec, {k: (self.lora_a[_key(*k)], self.lora_b[_key(*k)]) for k in self._keys})

    @torch.no_grad()
    def adapter(self) -> LoraAdapter:
        """A detached copy on the CPU: what is published."""
        return LoraAdapter(self.spec, {k: (a.detach().float().cpu().clone(), b.detach().float().cpu().clone())
                                       for k, (a, b) in self.live_adapter().weights.items()})

    def _batch(self, input_ids: torch.Tensor) -> LoraBatch | None:
        if not self.enabled:
            return None
        stack = LoraStack.one(self.base.config, self.live_adapter())
        slots = torch.zeros(input_ids.numel(), dtype=torch.int64, device=input_ids.device)
        return LoraBatch.build(stack, slots, self.dropout if self.training else 0.0)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      hook: AttentionHook | None = None) -> torch.Tensor:
        return self.base.hidden_states(input_ids, positions, hook, self._batch(input_ids))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                hook: AttentionHook | None = None) -> torch.Tensor:
        return self.base(input_ids, positions, hook, self._batch(input_ids))

    @contextmanager
    def disabled(self) -> Iterator[LoraModel]:
        """The base model alone, on the same weights, for the duration."""
        was, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = was

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

