"""Reward model: the SFT backbone with a scalar head, trained on preference pairs with
the pairwise loss -log sigmoid(r_chosen - r_rejected) (InstructGPT, TRL's
RewardTrainer) plus a small centring term that keeps scores near zero."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gpt.chat import chat_prompt_ids, chat_stop_ids, render_chat
from gpt.model import GPT
from gpt.tokenizer import SolTokenizer
from server.engine.api import SamplingParams
from server.engine.engine import Engine
from server.engine.offline import generate
from training.batching import global_indices, pad_right
from training.data.tasks import PreferencePair
from training.decoding import reply_text, training_engine
from training.loop import LoopConfig


@dataclass
class RewardConfig:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=3e-4, warmup_steps=10, batch_size=16))
    center_coef: float = 0.01
    # Weight of the language-model loss on the chosen replies. The pairwise loss alone
    # lets the backbone drift into a poor model of correct answers; this keeps training it
    # as one, and its likelihood is part of the score (see heads.RewardModel).
    lm_coef: float = 0.0


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 0.0) -> torch.Tensor:
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def reply_ids(tokenizer: SolTokenizer, prompt: str, reply: str) -> tuple[list[int], int]:
    """A scored sequence (the conversation through the reply's end-of-turn token) and
    the index where the reply starts."""
    start = len(render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True).ids)
    ids = render_chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]).ids
    return ids, start


def score_batch(seqs: list[tuple[list[int], int]], pad: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, last index, reply start) for the reward model."""
    ids = pad_right([s for s, _ in seqs], pad).to(device)
    last = torch.tensor([len(s) - 1 for s, _ in seqs], dtype=torch.long, device=device)
    start = torch.tensor([b for _, b in seqs], dtype=torch.long, device=device)
    return ids, last, start


class RewardStage:
    name = "reward"

    def __init__(self, tokenizer: SolTokenizer, pairs: list[PreferencePair], cfg: RewardConfig,
                 device: torch.device | str = "cpu",
                 encoded: list[tuple[tuple[list[int], int], tuple[list[int], int]]] | None = None) -> None:
        """`encoded`: ((chosen ids, reply start), (rejected ids, reply start)) per pair,
        already rendered (a user's file), instead of task `pairs`."""
        self.pairs = encoded if encoded is not None else [
            (reply_ids(tokenizer, p.problem.prompt, p.chosen), reply_ids(tokenizer, p.problem.prompt, p.rejected))
            for p in pairs]
        if not self.pairs:
            raise ValueError("reward training needs at least one preference pair")
        self.cfg = cfg
        self.pad = tokenizer.pad_id
        self.device = torch.device(device)

    def micro_batch(self, step: int, micro: int, rank: int, world: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picks = global_indices(len(self.pairs), self.cfg.loop.batch_size, world, self.cfg.loop.seed, step,
                               micro, rank)
        # Chosen replies first, rejected second, in one forward.
        seqs = [self.pairs[i][0] for i in picks] + [self.pairs[i][1] for i in picks]
        return score_batch(seqs, self.pad, self.device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        ids, last, start = batch
        scores, likelihood, lengths = model(ids, last, start, with_likelihood=True)
        chosen, rejected = scores.chunk(2)
        pairwise = pairwise_loss(chosen, rejected, self.cfg.center_coef)
        chosen_nll = -(likelihood.chunk(2)[0] / lengths.chunk(2)[0].clamp(min=1)).mean()
        loss = pairwise + self.cfg.lm_coef * chosen_nll
        return loss, {"loss": loss.item(), "pairwise_loss": pairwise.item(), "chosen_nll": chosen_nll.item(),
                      "accuracy": (chosen > rejected).float().mean().item(),
                      "margin": (chosen - rejected).mean().item(), "tokens": float(ids.numel())}


@torch.no_grad()
def score_replies(rm: nn.Module, tokenizer: SolTokenizer, items: list[tuple[str, str]], batch_size: int = 64
                  ) -> torch.Tensor:
    """RM scores of (prompt, reply) pairs."""
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(items), batch_size):
        seqs = [reply_ids(tokenizer, p, r) for p, r in items[i:i + batch_size]]
        out.append(rm(*score_batch(seqs, tokenizer.pad_id, device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def sample_replies(policy: GPT, tokenizer: SolTokenizer, prompts: list[str], samples_per_prompt: int,
                   seed: int, max_new_tokens: int = 24, engine: Engine | None = None) -> list[list[str | None]]:
    """`samples_per_prompt` replies per user prompt, sampled at temperature 1 by the
    engine (`engine`, one on `policy`, or one made for this call); None where a reply hit
    the token limit before its end-of-turn. Each reply has its own seed, so its draws do
    not depend on what else is in the batch."""
    policy.eval()
    stops = chat_stop_ids(tokenizer)
    jobs = [(i, s) for i in range(len(prompts)) for s in range(samples_per_prompt)]
    rendered = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    ids = [rendered[i] for i, _ in jobs]
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=max_new_tokens,
                             seed=seed * 1_000_003 + i * 131 + s) for i, s in jobs]
    if engine is None:
        engine = training_engine(policy, max((len(p) for p in rendered), default=1) + max_new_tokens)
    replies: list[list[str | None]] = [[] for _ in prompts]
    for (i, _), out in zip(jobs, generate(engine, ids, params, stops), strict=True):
        choice = out.choices[0]
        replies[i].append(reply_text(tokenizer, choice.token_ids, stops) if choice.stopped else None)
    return replies


def sample_wrong_replies(policy: GPT, tokenizer: SolTokenizer, problems: list,
                         samples_per_problem: int, seed: int, max_new_tokens: int = 24,
                         engine: Engine | None = None) -> dict[tuple[str, str], list[str]]:
    """The policy's own sampled replies that fail the verifier, keyed by (family, key): the
    hard negatives for the reward model. Unfinished replies are left out: they are not
    scored like finished ones."""
    replies = sample_replies(policy, tokenizer, [p.prompt for p in problems], samples_per_problem, seed,
                             max_new_tokens, engine)
    wrong: dict[tuple[str, str], list[str]] = {}
    for p, texts in zip(problems, replies, strict=True):
        for text in texts:
            if text is not None and text.strip() and not p.check(text):
                wrong.setdefault((p.family, p.key), []).append(text)
    return wrong
