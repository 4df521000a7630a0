"""Deterministic batch drawing shared by the stages.

A batch is a pure function of (seed, step, micro-batch): the global batch of
`batch_size * world` items is drawn once and each rank takes its slice, so one process
with the doubled batch sees exactly what two ranks see together, and a resumed run
draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    # Large odd multipliers keep (seed, step, micro) triples from colliding.
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 9_176 + micro)


def global_indices(n_items: int, batch_size: int, world: int, seed: int, step: int, micro: int,
                   rank: int) -> list[int]:
    """This rank's slice of the step's global sample (with replacement) of item indices."""
    g = step_generator(seed, step, micro)
    picks = torch.randint(0, n_items, (batch_size * world,), generator=g)
    return picks[rank * batch_size:(rank + 1) * batch_size].tolist()


def rank_weight(counts: Sequence[float], rank: int) -> float:
    """The factor that turns rank `rank`'s mean over its own items into its share of
    the mean over every rank's items, given each rank's item count (`counts`, one per
    rank, known to every rank because the global batch is drawn on each). DDP averages
    gradients over ranks, so a rank's loss must be `mean_local * n_local * world / n_all`
    for the step to follow the global per-token mean, as one process with the whole batch
    would; 1.0 with one process."""
    total = sum(counts)
    return counts[rank] * len(counts) / total if total else 1.0


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Right padding keeps real tokens at their natural positions, so plain causal
    attention never lets them see a pad."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out
