"""Held-out measures for the stages that train on users' own files, taken before and
after training on the same rows: SFT / continued-pretraining loss, reward-model pairwise
loss and accuracy, and mean reward of greedy replies to held-out RL prompts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt.chat import chat_stop_ids
from gpt.model import GPT
from gpt.tokenizer import SolTokenizer
from server.engine.api import SamplingParams
from server.engine.offline import generate
from training.batching import IGNORE_INDEX, pad_right
from training.datasets.prefs import EncodedPair
from training.decoding import reply_text, training_engine
from training.heads import RewardModel
from training.stages.reward import pairwise_loss, score_batch


@torch.no_grad()
def sft_loss(model: GPT, examples: list[tuple[list[int], list[int]]], pad: int, batch_size: int = 32) -> float:
    """Mean next-token loss over every trained token of the examples (token-weighted)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        inputs = pad_right([x for x, _ in chunk], pad).to(device)
        targets = pad_right([y for _, y in chunk], IGNORE_INDEX).to(device)
        logits = model(inputs).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(1, count)


@torch.no_grad()
def text_loss(model: GPT, tokens: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """Mean next-token loss over non-overlapping windows of a token stream."""
    model.eval()
    device = next(model.parameters()).device
    n = (tokens.numel() - 1) // seq_len
    if n == 0:
        return math.nan
    windows = torch.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    total = 0.0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(device)
        total += F.cross_entropy(model(batch[:, :-1]).float().flatten(0, 1), batch[:, 1:].flatten(),
                                 reduction="sum").item()
    return total / (n * seq_len)


def reward_sequences(pairs: list[EncodedPair]) -> list[tuple[tuple[list[int], int], tuple[list[int], int]]]:
    """A pair's sides as the reward model reads them: (ids, first reply token)."""
    return [((p.chosen.ids, p.chosen.first_trained), (p.rejected.ids, p.rejected.first_trained)) for p in pairs]


@torch.no_grad()
def reward_pairs_eval(rm: RewardModel, pairs: list[EncodedPair], pad: int, batch_size: int = 32
                      ) -> dict[str, float]:
    """Pairwise loss -log sigmoid(r_c - r_r) and the share of pairs scored the right way."""
    rm.eval()
    device = next(rm.parameters()).device
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        seqs = reward_sequences(pairs[i:i + batch_size])
        scores = rm(*score_batch([c for c, _ in seqs] + [r for _, r in seqs], pad, device)).float().cpu()
        c, r = scores.chunk(2)
        chosen.append(c)
        rejected.append(r)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"loss": pairwise_loss(c, r).item(), "accuracy": (c > r).float().mean().item(), "n": len(pairs)}


@torch.no_grad()
def greedy_replies(model: GPT, tokenizer: SolTokenizer, prompts: list[list[int]], max_new_tokens: int
                   ) -> tuple[list[list[int]], list[str]]:
    """Greedy replies (token ids with the stop token, and text) through the serving engine."""
    model.eval()
    stops = chat_stop_ids(tokenizer)
    engine = training_engine(model, max(len(p) for p in prompts) + max_new_tokens)
    outputs = generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), stops)
    return [list(o.token_ids) for o in outputs], [reply_text(tokenizer, o.token_ids, stops) for o in outputs]
