"""Paired-seed statistics against scipy's own paired t-test and constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from structkd.compare import paired_gain, seeds_to_resolve


@pytest.mark.parametrize("seed, n", [(0, 2), (1, 3), (2, 5), (3, 10)])
def test_the_interval_is_scipys_paired_t_interval(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.5, n)
    method = base + rng.normal(0.4, 0.6, n)
    g = paired_gain(method.tolist(), base.tolist())
    ref = stats.ttest_rel(method, base).confidence_interval(0.95)
    assert (g.low, g.high) == pytest.approx((ref.low, ref.high), rel=1e-9, abs=1e-12)
    assert g.mean == pytest.approx(float(np.mean(method - base)))
    assert g.sd == pytest.approx(float(np.std(method - base, ddof=1)))
    g90 = paired_gain(method.tolist(), base.tolist(), confidence=0.9)
    ref90 = stats.ttest_rel(method, base).confidence_interval(0.9)
    assert (g90.low, g90.high) == pytest.approx((ref90.low, ref90.high), rel=1e-9)


def test_verdicts_of_constructed_cases() -> None:
    base = [2.0, 3.0, 2.5]
    noise = [0.1, -0.1, 0.0]
    up = [b + 1.0 + d for b, d in zip(base, noise, strict=True)]
    down = [b - 1.0 + d for b, d in zip(base, noise, strict=True)]
    assert paired_gain(up, base).verdict == "gain"
    assert paired_gain(down, base).verdict == "harm"
    open_case = paired_gain([b + d for b, d in zip(base, [0.5, -0.3, 0.1], strict=True)], base)
    assert open_case.verdict == "no evidence of gain"
    assert open_case.low < 0 < open_case.high
    assert "no evidence of gain" in open_case.sentence()
    one = paired_gain([5.0], [2.0])
    assert one.verdict == "no evidence of gain" and one.low is None
    assert "1 seed: no interval" in one.sentence()


def test_a_method_equal_to_none_in_expectation_is_rarely_called_a_gain() -> None:
    """At the default 3 seeds and 95%, a method no better than none is called a gain in about
    2.5% of studies (one tail of the interval), never systematically."""
    rng = np.random.default_rng(0)
    trials, gains, harms = 4000, 0, 0
    for _ in range(trials):
        base = rng.normal(3.0, 0.5, 3)
        method = base + rng.normal(0.0, 0.5, 3)
        v = paired_gain(method.tolist(), base.tolist()).verdict
        gains += v == "gain"
        harms += v == "harm"
    assert gains / trials == pytest.approx(0.025, abs=0.01)
    assert harms / trials == pytest.approx(0.025, abs=0.01)


def test_seeds_to_resolve_is_the_smallest_sufficient_count() -> None:
    mean, sd = 0.4, 0.8
    n = seeds_to_resolve(mean, sd)
    assert n is not None and n > 3
    half = lambda k: stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)  # noqa: E731
    assert half(n) < mean <= half(n - 1)
    g = paired_gain([1.4, 0.2, 1.0], [1.0, 1.0, 1.0])
    assert g.verdict == "no evidence of gain"
    assert g.seeds_needed == seeds_to_resolve(g.mean, g.sd)
    assert seeds_to_resolve(0.0, 1.0) is None


def test_mismatched_or_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"2 method values and 3 baseline values"):
        paired_gain([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"no seeds"):
        paired_gain([], [])
    with pytest.raises(ValueError, match=r"confidence=1.5"):
        paired_gain([1, 2], [1, 2], confidence=1.5)
