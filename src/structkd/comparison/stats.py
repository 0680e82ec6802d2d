"""Paired-seed statistics of a comparison: the gain over no distillation with a confidence
interval, a verdict in words, and, for an open question, the gains the spread lets N seeds
resolve.

Each seed gives one paired difference (the method's AP minus the plain student's, same initial
weights, same data order), so the interval is Student's t over those differences:
``mean +- t_{1-alpha/2, n-1} * sd / sqrt(n)``. It excludes 0 exactly when ``|mean|`` exceeds
that half-width, so ``t_{1-alpha/2, n-1} * sd / sqrt(n)`` is the smallest gain ``n`` seeds can
resolve at spread ``sd``: what an open verdict reports, rather than extrapolating the observed
mean (which, for a method that does nothing, is noise and would promise a resolution).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["PairedGain", "detectable_gain", "paired_gain", "seeds_to_resolve"]

GAIN, NO_EVIDENCE, HARM = "gain", "no evidence of gain", "harm"


def _t(confidence: float, df: int) -> float:
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, df))


def _ap(x: float) -> str:
    """An AP amount: two decimals, or two significant digits below 0.005 (not "0.00")."""
    return f"{x:.2f}" if x == 0 or abs(x) >= 0.005 else f"{x:.2g}"


# Seed counts an open verdict states the resolvable gain for (those above the current count).
MORE_SEEDS = (5, 10, 20)


def detectable_gain(sd: float, n: int, confidence: float = 0.95) -> float:
    """The smallest gain whose ``n``-seed interval excludes 0 at this spread of the paired
    differences: ``t_{(1+confidence)/2, n-1} * sd / sqrt(n)`` (the interval's half-width)."""
    if n < 2:
        raise ValueError(f"detectable_gain: n={n!r}; expected at least 2 seeds")
    return _t(confidence, n - 1) * sd / math.sqrt(n)


def seeds_to_resolve(gain: float, sd: float, confidence: float = 0.95,
                     limit: int = 1000) -> int | None:
    """The smallest number of seeds whose interval would exclude 0 for a true ``gain`` (a gain
    you state, e.g. the smallest worth having) at this spread; None when the gain is 0 or more
    than ``limit`` seeds would be needed."""
    if gain == 0 or not math.isfinite(gain) or not math.isfinite(sd):
        return None
    if sd == 0:
        return 2
    n = np.arange(2, limit + 1)
    half = _scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)
    enough = np.flatnonzero(half < abs(gain))
    return int(n[enough[0]]) if enough.size else None


@dataclass(frozen=True)
class PairedGain:
    """A method's paired gain over the baseline across seeds."""

    n: int
    mean: float
    sd: float | None  # sample standard deviation (None with one seed)
    low: float | None  # confidence interval of the mean (None with one seed)
    high: float | None
    confidence: float
    verdict: str  # GAIN, NO_EVIDENCE or HARM
    # for NO_EVIDENCE: (seeds, the smallest gain that many seeds resolve at this spread), for
    # the seeds run and MORE_SEEDS above them; None with one seed or another verdict
    detectable: tuple[tuple[int, float], ...] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self) -> str:
        """The verdict in words, with the numbers that decide it."""
        pct = f"{100 * self.confidence:.0f}%"
        if self.low is None or self.high is None:
            return (f"{self.mean:+.2f} AP on 1 seed: no interval, so no evidence either way; run "
                    "at least 2 seeds (3 or more for a useful interval)")
        ci = (f"{self.mean:+.2f} AP, {pct} CI [{self.low:+.2f}, {self.high:+.2f}] over "
              f"{self.n} seeds")
        if self.verdict == GAIN:
            return f"gain: {ci}"
        if self.verdict == HARM:
            return f"harm: {ci}"
        return f"no evidence of gain: {ci}{self._resolvable()}"

    def _resolvable(self) -> str:
        """What the spread lets more seeds resolve (nothing about the observed mean)."""
        if not self.detectable or self.sd is None:
            return ""
        if self.sd == 0:
            return "; every seed gave the same difference (sd 0)"
        (n, now), *more = self.detectable
        text = (f"; at this spread (per-seed gains vary by sd {_ap(self.sd)} AP) {n} seeds "
                f"resolve only gains beyond ±{_ap(now)} AP")
        if more:
            text += "; " + ", ".join(f"{k} seeds ±{_ap(g)}" for k, g in more)
        return text


def paired_gain(method: Sequence[float], baseline: Sequence[float],
                confidence: float = 0.95) -> PairedGain:
    """The paired gain of ``method`` over ``baseline`` (one value per seed, in seed order).

    Verdict: "gain" when the whole interval is above 0, "harm" when it is below, otherwise
    "no evidence of gain" (with one seed there is no interval, hence no evidence either way).
    """
    if len(method) != len(baseline):
        raise ValueError(f"paired_gain: {len(method)} method values and {len(baseline)} "
                         "baseline values; expected one of each per seed")
    if not method:
        raise ValueError("paired_gain: no seeds")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}; expected a number in (0, 1)")
    diffs = [float(a) - float(b) for a, b in zip(method, baseline, strict=True)]
    n, mean = len(diffs), statistics.fmean(diffs)
    if n == 1:
        return PairedGain(1, mean, None, None, None, confidence, NO_EVIDENCE, None)
    sd = statistics.stdev(diffs)
    half = _t(confidence, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = GAIN if low > 0 else HARM if high < 0 else NO_EVIDENCE
    detectable = None
    if verdict == NO_EVIDENCE:
        detectable = tuple((k, detectable_gain(sd, k, confidence))
                           for k in (n, *(m for m in MORE_SEEDS if m > n)))
    return PairedGain(n, mean, sd, low, high, confidence, verdict, detectable)
