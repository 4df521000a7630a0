"""Scalar heads on the shared trunk: the reward model and the PPO policy's value head.

Both read `GPT.hidden_states` (the final-normed trunk output), so they add one linear
layer and no second model definition. Their weights travel in a checkpoint's
`heads.safetensors` under the names below.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt.model import GPT

REWARD_HEAD = "reward_head"
VALUE_HEAD = "value_head"


def _scalar_head(d_model: int) -> nn.Linear:
    head = nn.Linear(d_model, 1)
    # Start at zero: the first reward/value estimates are neutral instead of noise.
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def head_tensors(prefix: str, head: nn.Linear) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": head.weight.detach().cpu(), f"{prefix}.bias": head.bias.detach().cpu()}


def load_head(prefix: str, head: nn.Linear, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        head.weight.copy_(tensors[f"{prefix}.weight"])
        head.bias.copy_(tensors[f"{prefix}.bias"])


class RewardModel(nn.Module):
    """The policy backbone with a scalar head read at each sequence's last token."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.head = _scalar_head(gpt.config.d_model)
        if not gpt.config.tie_embeddings:
            # An untied LM head is unused here; frozen, DDP does not wait for its gradient.
            gpt.lm_head.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        hidden = self.gpt.hidden_states(input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.head(hidden[rows, last_index]).squeeze(-1).float()

    def heads(self) -> dict[str, torch.Tensor]:
        return head_tensors(REWARD_HEAD, self.head)

    @classmethod
    def from_parts(cls, gpt: GPT, heads: dict[str, torch.Tensor]) -> RewardModel:
        model = cls(gpt)
        load_head(REWARD_HEAD, model.head, heads)
        return model.to(next(gpt.parameters()).device)


class PolicyWithValue(nn.Module):
    """The PPO policy: the LM and a value head sharing one trunk (one forward for both)."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.head = _scalar_head(gpt.config.d_model)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.gpt.hidden_states(input_ids)
        return self.gpt.lm_head(hidden), self.head(hidden).squeeze(-1).float()

    def heads(self) -> dict[str, torch.Tensor]:
        return head_tensors(VALUE_HEAD, self.head)
