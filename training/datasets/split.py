"""The held-out split carved from a training file when no evaluation file is given."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

from training.datasets.errors import DataError

T = TypeVar("T")

HELDOUT_FRACTION = 0.1      # of the rows, at least one; deterministic by the seed


def heldout_split(items: Sequence[T], seed: int, path: str, fraction: float = HELDOUT_FRACTION
                  ) -> tuple[list[T], list[T]]:
    """(train, held out): `fraction` of the rows (at least one) drawn by `seed`, the
    rest in file order."""
    if len(items) < 2:
        raise DataError(path, 1, "file", "at least 2 rows to hold one out for evaluation (or --eval-data)",
                        f"{len(items)} row")
    n_eval = min(len(items) - 1, max(1, math.ceil(len(items) * fraction)))
    order = list(range(len(items)))
    random.Random(f"heldout:{seed}").shuffle(order)
    held = set(order[:n_eval])
    return ([x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held])
