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
    """The policy backbone with a scalar head read at each sequence's last token, plus
    a learned multiple of the backbone's own log-likelihood of the reply.

    Why the likelihood term: checking an answer means comparing each reply token with
    what the backbone predicts at that position, and the LM head already does that
    comparison; a head on the last hidden state alone has to relearn it through
    attention and, at this project's scale, does not within the budget (held-out pair
    accuracy about 0.65 against about 0.9 with the term). It is the implicit reward of
    Rafailov et al. (2023) without a reference model, and all of it is trained by the
    same pairwise loss."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.head = _scalar_head(gpt.config.d_model)
        self.lm_weight = nn.Parameter(torch.ones(1))

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor, reply_start: torch.Tensor,
                with_likelihood: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (B,) of right-padded sequences whose reply occupies
        [reply_start, last_index] in each row; `with_likelihood` also returns the
        backbone's summed log-likelihood of each reply and the reply lengths."""
        hidden = self.gpt.hidden_states(input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        logp = torch.log_softmax(self.gpt.lm_head(hidden[:, :-1]).float(), dim=-1)
        logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)            # log p(token t+1)
        pos = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)[None, :]
        in_reply = (pos >= reply_start[:, None] - 1) & (pos <= last_index[:, None] - 1)
        likelihood = (logp * in_reply).sum(1)
        score = self.head(hidden[rows, last_index]).squeeze(-1).float() + self.lm_weight * likelihood
        return (score, likelihood, in_reply.sum(1)) if with_likelihood else score

    def heads(self) -> dict[str, torch.Tensor]:
        return {**head_tensors(REWARD_HEAD, self.head), f"{REWARD_HEAD}.lm_weight": self.lm_weight.detach().cpu()}

    @classmethod
    def from_parts(cls, gpt: GPT, heads: dict[str, torch.Tensor]) -> RewardModel:
        model = cls(gpt)
        load_head(REWARD_HEAD, model.head, heads)
        with torch.no_grad():
            model.lm_weight.copy_(heads[f"{REWARD_HEAD}.lm_weight"])
        return model.to(next(gpt.parameters()).device)


class PolicyWithValue(nn.Module):
    """The PPO policy: the LM and a value head on one trunk (one forward for both).

    The value head reads the trunk's features without sending gradients into them: its
    regression targets are the (noisy) returns, and on a small trunk that noise reaches
    the policy through the shared weights (measured on the `cpu` preset: with a perfect
    verifier as reward, lr 3e-4, 40 updates, held-out reverse accuracy fell from 0.95 to
    0.78 with a shared trunk and to 0.88 without the critic's gradient). The critic is
    then a linear probe of the policy's features."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.head = _scalar_head(gpt.config.d_model)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.gpt.hidden_states(input_ids)
        return self.gpt.lm_head(hidden), self.head(hidden.detach()).squeeze(-1).float()

    def heads(self) -> dict[str, torch.Tensor]:
        return head_tensors(VALUE_HEAD, self.head)
