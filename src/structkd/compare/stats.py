"""Paired-seed statistics of a comparison: the gain over no distillation with a confidence
interval, a verdict in words, and how many seeds would resolve an open question.

Each seed gives one paired difference (the method's AP minus the plain student's, same initial
weights, same data order), so the interval is Student's t over those differences:
``mean +- t_{1-alpha/2, n-1} * sd / sqrt(n)``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["PairedGain", "paired_gain", "seeds_to_resolve"]

GAIN, NO_EVIDENCE, HARM = "gain", "no evidence of gain", "harm"


def _t(confidence: float, df: int) -> float:
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, df))


def seeds_to_resolve(mean: float, sd: float, confidence: float = 0.95,
                     limit: int = 1000) -> int | None:
    """The smallest number of seeds whose interval would exclude 0 if the paired differences
    kept this mean and spread; None when the mean is 0 or more than ``limit`` seeds would be
    needed."""
    if mean == 0 or not math.isfinite(mean) or not math.isfinite(sd):
        return None
    if sd == 0:
        return 2
    n = np.arange(2, limit + 1)
    half = _scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)
    enough = np.flatnonzero(half < abs(mean))
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
    seeds_needed: int | None  # for NO_EVIDENCE: seeds that would resolve it at this spread

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
        more = ("; at this spread no number of seeds would separate it from 0"
                if self.seeds_needed is None else
                f"; about {self.seeds_needed} seeds would resolve it if mean and spread held")
        return f"no evidence of gain: {ci}{more}"


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
    needed = seeds_to_resolve(mean, sd, confidence) if verdict == NO_EVIDENCE else None
    return PairedGain(n, mean, sd, low, high, confidence, verdict, needed)
