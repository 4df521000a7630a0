"""The pure parts of the sol-vs-vLLM benchmark: workload shapes, latency percentiles,
ratios and the greedy-agreement check. Standard library only, so they are testable
without torch, sol's engine or vLLM."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One request's size: prompt tokens in, exactly `new_tokens` out (EOS ignored)."""

    prompt_len: int
    new_tokens: int


def uniform_shapes(n: int, prompt_len: int, new_tokens: int) -> list[Shape]:
    return [Shape(prompt_len, new_tokens) for _ in range(n)]


def mixed_shapes(n: int, seed: int, context: int, prompt_median: float = 48.0, prompt_sigma: float = 1.0,
                 new_median: float = 48.0, new_sigma: float = 0.9, min_len: int = 4) -> list[Shape]:
    """Prompt and output lengths drawn from lognormal distributions (medians and sigmas
    in tokens / natural-log units), as in chat traffic: most requests short, a few long.
    This is where continuous batching matters: a static batch would wait for its longest
    member. Every request fits `context` (prompt + output); the output is capped first at
    half the context so one long prompt does not squeeze its output to nothing."""
    if context < 2 * min_len:
        raise ValueError(f"context {context} is too short for requests of at least {min_len} + {min_len} tokens")
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        new = int(round(rng.lognormvariate(math.log(new_median), new_sigma)))
        new = max(min_len, min(new, context // 2))
        prompt = int(round(rng.lognormvariate(math.log(prompt_median), prompt_sigma)))
        prompt = max(min_len, min(prompt, context - new))
        shapes.append(Shape(prompt, new))
    return shapes


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between the closest ranks
    (numpy's default), NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(values_s: Sequence[float], name: str) -> dict[str, float]:
    """p50/p90/p99 and mean of latencies given in seconds, reported in milliseconds."""
    out = {f"{name}_p{q}_ms": percentile(values_s, q) * 1e3 for q in (50, 90, 99)}
    out[f"{name}_mean_ms"] = (sum(values_s) / len(values_s) * 1e3) if values_s else float("nan")
    return out


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN where either is missing or the denominator is 0."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return float("nan")
    return numerator / denominator


# For each metric, which way is better: the report says whether sol wins.
HIGHER_IS_BETTER = {"tokens_per_s": True}


def sol_over_vllm(sol: dict[str, float], vllm: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    """sol / vLLM for each metric: above 1 means sol is faster for tokens/s and slower for
    latencies."""
    return {k: ratio(sol.get(k, float("nan")), vllm.get(k, float("nan"))) for k in keys}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict[str, float]:
    """How far two engines' greedy outputs for the same requests agree.

    requests_identical: share of requests whose whole outputs are equal.
    tokens_agree: share of tokens before the first divergence; after a divergence the
    two continue from different histories, so later matches or mismatches mean nothing.
    Near-ties in the logits (random weights, bf16) make a few divergences expected; a
    wrong engine disagrees from the first tokens on."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outputs against {len(b)}: the workloads differ")
    if not a:
        return {"requests": 0, "requests_identical": float("nan"), "tokens_agree": float("nan"),
                "first_token_agree": float("nan")}
    identical = sum(1 for x, y in zip(a, b, strict=True) if list(x) == list(y))
    total = sum(max(len(x), len(y)) for x, y in zip(a, b, strict=True))
    agreed = sum(common_prefix(x, y) for x, y in zip(a, b, strict=True))
    first = sum(1 for x, y in zip(a, b, strict=True) if x and y and x[0] == y[0])
    return {"requests": len(a), "requests_identical": identical / len(a),
            "tokens_agree": agreed / total if total else float("nan"), "first_token_agree": first / len(a)}


def per_request_tpot(first_token_s: float, last_token_s: float, new_tokens: int) -> float | None:
    """Mean time per output token after the first (vLLM's TPOT); None for one-token outputs."""
    if new_tokens < 2:
        return None
    return (last_token_s - first_token_s) / (new_tokens - 1)


def best_round(rounds: list[dict]) -> dict:
    """The round with the most tokens per second of wall time, with every round's rate
    kept beside it: on a shared machine other work only slows a run down, so the fastest
    round is the closest to the engine's own speed."""
    if not rounds:
        raise ValueError("no rounds")
    best = max(rounds, key=lambda r: r["tokens"] / r["wall_s"])
    return {**best, "rounds_tokens_per_s": [r["tokens"] / r["wall_s"] for r in rounds]}
