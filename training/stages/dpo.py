"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from
preference pairs with no reward model, against the starting model as a frozen reference:

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

where pi_* and ref_* are the summed log-probs of the chosen / rejected completion's
trained tokens (the chat template's assistant tokens of the completion) under the policy
and the reference. The reference's log-probs never change, so they are computed once
for every pair when the stage is made."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gpt.model import GPT
from training.batching import global_indices, pad_right
from training.datasets.prefs import EncodedPair
from training.loop import LoopConfig


@dataclass
class DPOConfig:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=5e-4, warmup_steps=4, batch_size=16,
                                                                weight_decay=0.0))
    beta: float = 0.1


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probs of the tokens where `mask` (B, T) is 1, given the tokens
    before them."""
    logits = model(ids[:, :-1]).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(1)


def pair_batch(pairs: list[EncodedPair], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen sides then rejected sides, right-padded into one batch: (ids, mask)."""
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids = pad_right([s.ids for s in sides], pad).to(device)
    mask = pad_right([s.mask for s in sides], 0).to(device).float()
    return ids, mask


def dpo_loss(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair margin beta * ((pi_c - ref_c) - (pi_r - ref_r)))."""
    margin = beta * ((policy_c - ref_c) - (policy_r - ref_r))
    return -F.logsigmoid(margin).mean(), margin


@torch.no_grad()
def reference_logprobs(reference: GPT, pairs: list[EncodedPair], pad: int, batch_size: int = 32
                       ) -> torch.Tensor:
    """(N, 2): the reference's summed log-probs of each pair's chosen and rejected side."""
    device = next(reference.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        ids, mask = pair_batch(chunk, pad, device)
        out.append(sequence_logprobs(reference, ids, mask).view(2, len(chunk)).T.cpu())
    return torch.cat(out)


class DPOStage:
    name = "dpo"

    def __init__(self, reference: GPT, pairs: list[EncodedPair], pad: int, cfg: DPOConfig,
                 device: torch.device | str = "cpu") -> None:
        if not pairs:
            raise ValueError("DPO needs at least one preference pair")
        self.pairs = pairs
        self.pad = pad
        self.cfg = cfg
        self.device = torch.device(device)
        reference.eval()
        self.ref = reference_logprobs(reference, pairs, pad)

    def micro_batch(self, step: int, micro: int, rank: int, world: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picks = global_indices(len(self.pairs), self.cfg.loop.batch_size, world, self.cfg.loop.seed, step,
                               micro, rank)
        ids, mask = pair_batch([self.pairs[i] for i in picks], self.pad, self.device)
        return ids, mask, self.ref[picks].to(self.device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask, ref = batch
        policy_c, policy_r = sequence_logprobs(model, ids, mask).chunk(2)
        loss, margin = dpo_loss(policy_c, policy_r, ref[:, 0], ref[:, 1], self.cfg.beta)
        return loss, {"loss": loss.item(), "accuracy": (margin > 0).float().mean().item(),
                      "margin": margin.mean().item(), "tokens": float(ids.numel())}


@torch.no_grad()
def dpo_eval(policy: GPT, reference_lp: torch.Tensor, pairs: list[EncodedPair], pad: int, beta: float,
             batch_size: int = 32) -> dict[str, float]:
    """Held-out DPO loss and preference accuracy (the share of pairs whose implicit
    reward margin is positive; ties, as when the policy is the reference, count as 0.5)."""
    policy.eval()
    lp = reference_logprobs(policy, pairs, pad, batch_size)
    loss, margin = dpo_loss(lp[:, 0], lp[:, 1], reference_lp[:, 0], reference_lp[:, 1], beta)
    wins = (margin > 1e-6).float() + 0.5 * (margin.abs() <= 1e-6).float()
    return {"loss": loss.item(), "accuracy": wins.mean().item(), "margin": margin.mean().item(),
            "likelihood_accuracy": (lp[:, 0] > lp[:, 1]).float().mean().item(), "n": len(pairs)}
