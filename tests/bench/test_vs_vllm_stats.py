"""The pure parts of `bench.vs_vllm`: no torch model, no sol engine, no vLLM."""

from __future__ import annotations

import math
import statistics

import pytest

from bench.vllm_stats import (
    Shape,
    agreement,
    best_round,
    common_prefix,
    latency_summary,
    mixed_shapes,
    per_request_tpot,
    percentile,
    ratio,
    sol_over_vllm,
    uniform_shapes,
)


def test_mixed_shapes_are_deterministic_per_seed():
    a = mixed_shapes(200, seed=7, context=512)
    assert a == mixed_shapes(200, seed=7, context=512)
    assert a != mixed_shapes(200, seed=8, context=512)


def test_mixed_shapes_fit_the_context_and_are_long_tailed():
    shapes = mixed_shapes(2000, seed=0, context=512)
    assert all(s.prompt_len >= 4 and 4 <= s.new_tokens <= 256 for s in shapes)
    assert all(s.prompt_len + s.new_tokens <= 512 for s in shapes)
    for lens in ([s.prompt_len for s in shapes], [s.new_tokens for s in shapes]):
        median = statistics.median(lens)
        # A long tail: the mean sits above the median and the top percent is several
        # medians long (a uniform draw would give mean == median and p99 < 2 medians).
        assert statistics.fmean(lens) > 1.15 * median
        assert percentile(lens, 99) > 4 * median


def test_mixed_shapes_refuse_a_context_too_short():
    with pytest.raises(ValueError):
        mixed_shapes(3, seed=0, context=6)


def test_uniform_shapes():
    assert uniform_shapes(3, 128, 64) == [Shape(128, 64)] * 3


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_latency_summary_reports_milliseconds():
    s = latency_summary([0.010, 0.020, 0.030], "ttft")
    assert s["ttft_p50_ms"] == pytest.approx(20.0)
    assert s["ttft_mean_ms"] == pytest.approx(20.0)
    assert set(s) == {"ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "ttft_mean_ms"}


def test_ratios():
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(float("nan"), 2.0))
    r = sol_over_vllm({"tokens_per_s": 2000.0, "ttft_p50_ms": 30.0}, {"tokens_per_s": 4000.0, "ttft_p50_ms": 10.0},
                      ["tokens_per_s", "ttft_p50_ms", "itl_p50_ms"])
    assert r["tokens_per_s"] == 0.5 and r["ttft_p50_ms"] == 3.0 and math.isnan(r["itl_p50_ms"])


def test_agreement_counts_tokens_before_the_first_divergence():
    sol = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]]
    vllm = [[1, 2, 3, 4], [5, 6, 0, 8], [1, 9]]
    a = agreement(sol, vllm)
    assert a["requests"] == 3
    assert a["requests_identical"] == pytest.approx(1 / 3)
    # 4 + 2 + 0 tokens agree before divergence; the matching 8 after it does not count.
    assert a["tokens_agree"] == pytest.approx(6 / 10)
    assert a["first_token_agree"] == pytest.approx(2 / 3)
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_agreement_refuses_different_workloads_and_handles_none():
    with pytest.raises(ValueError):
        agreement([[1]], [[1], [2]])
    assert math.isnan(agreement([], [])["tokens_agree"])
    assert agreement([[1, 2]], [[1, 2]])["tokens_agree"] == 1.0


def test_tpot_and_best_round():
    assert per_request_tpot(1.0, 2.0, 11) == pytest.approx(0.1)
    assert per_request_tpot(1.0, 1.0, 1) is None
    best = best_round([{"tokens": 100, "wall_s": 2.0, "id": "a"}, {"tokens": 100, "wall_s": 1.0, "id": "b"}])
    assert best["id"] == "b" and best["rounds_tokens_per_s"] == [50.0, 100.0]
    with pytest.raises(ValueError):
        best_round([])
