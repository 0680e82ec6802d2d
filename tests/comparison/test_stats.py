"""Paired-seed statistics against scipy's own paired t-test and constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from structkd.comparison import detectable_gain, paired_gain, seeds_to_resolve


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
    gain, sd = 0.4, 0.8
    n = seeds_to_resolve(gain, sd)
    assert n is not None and n > 3
    half = lambda k: stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)  # noqa: E731
    assert half(n) < gain <= half(n - 1)
    g = paired_gain([1.4, 0.2, 1.0], [1.0, 1.0, 1.0])
    assert g.verdict == "no evidence of gain"
    assert seeds_to_resolve(0.0, 1.0) is None


@pytest.mark.parametrize("seed, n, confidence", [(0, 2, 0.95), (1, 3, 0.95), (2, 4, 0.9),
                                                 (3, 6, 0.95), (4, 12, 0.99)])
def test_an_open_verdict_states_the_gain_its_spread_resolves(seed: int, n: int,
                                                              confidence: float) -> None:
    """At the observed spread s, n seeds resolve a gain beyond t_{(1+c)/2, n-1} * s / sqrt(n):
    scipy's t quantile, the interval's own half-width, and the verdict at that gain agree."""
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.5, n)
    diffs = rng.normal(0.0, 0.4, n)
    diffs += -diffs.mean() + 0.01  # a mean well inside the interval: an open verdict
    g = paired_gain((base + diffs).tolist(), base.tolist(), confidence)
    assert g.verdict == "no evidence of gain"
    s = float(np.std(diffs, ddof=1))
    expected = [(k, stats.t.ppf((1 + confidence) / 2, k - 1) * s / math.sqrt(k))
                for k in (n, *(k for k in (5, 10, 20) if k > n))]
    assert [k for k, _ in g.detectable] == [k for k, _ in expected]
    assert [v for _, v in g.detectable] == pytest.approx([v for _, v in expected], rel=1e-12)
    assert detectable_gain(s, n, confidence) == pytest.approx(expected[0][1], rel=1e-12)
    ref = stats.ttest_rel(base + diffs, base).confidence_interval(confidence)
    assert g.detectable[0][1] == pytest.approx((ref.high - ref.low) / 2, rel=1e-9)
    # the same spread around a mean just past that gain is resolved, just short of it is not
    centred = diffs - diffs.mean()
    for factor, verdict in ((1.001, "gain"), (0.999, "no evidence of gain")):
        shifted = centred + factor * g.detectable[0][1]
        assert paired_gain((base + shifted).tolist(), base.tolist(),
                           confidence).verdict == verdict


def test_the_sentence_does_not_extrapolate_the_observed_mean() -> None:
    """Two open rows with the same spread and different means get the same resolvable gains;
    a row whose gain is ~0 (a 1e-9 weight) is not promised a resolution by more seeds."""
    base = [3.0, 3.2, 2.9]
    spread = [0.3, -0.2, -0.1]
    a = paired_gain([x + d + 0.001 for x, d in zip(base, spread, strict=True)], base)
    b = paired_gain([x + d + 0.1 for x, d in zip(base, spread, strict=True)], base)
    assert a.verdict == b.verdict == "no evidence of gain"
    assert [k for k, _ in a.detectable] == [k for k, _ in b.detectable] == [3, 5, 10, 20]
    assert [v for _, v in a.detectable] == pytest.approx([v for _, v in b.detectable])
    tail = a.sentence().split("over 3 seeds")[1]
    assert tail == b.sentence().split("over 3 seeds")[1]
    sd = float(np.std(spread, ddof=1))
    assert f"sd {sd:.2f} AP" in tail
    assert f"3 seeds resolve only gains beyond ±{stats.t.ppf(0.975, 2) * sd / math.sqrt(3):.2f}" \
        in tail
    assert f"20 seeds ±{stats.t.ppf(0.975, 19) * sd / math.sqrt(20):.2f}" in tail
    assert "would resolve it" not in tail
    noise = paired_gain([3.0 + 1e-3, 3.2 - 0.5e-3, 2.9 + 0.8e-3], base)
    assert "±0.00 AP" not in noise.sentence()  # small amounts keep two significant digits
    assert paired_gain([2.0, 3.0], [2.0, 3.0]).sentence().endswith("(sd 0)")
    assert paired_gain([5.0], [2.0]).detectable is None
    assert paired_gain([3.0, 4.1, 5.0], [2.0, 3.0, 4.0]).detectable is None  # a gain
    with pytest.raises(ValueError, match=r"n=1; expected at least 2 seeds"):
        detectable_gain(0.5, 1)


def test_mismatched_or_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"2 method values and 3 baseline values"):
        paired_gain([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"no seeds"):
        paired_gain([], [])
    with pytest.raises(ValueError, match=r"confidence=1.5"):
        paired_gain([1, 2], [1, 2], confidence=1.5)
