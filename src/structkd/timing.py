"""Wall-clock timing of zero-argument calls, interleaved call by call: the one timing loop that
the latency checks, the demo and the benchmarks share.

Timing several candidates one after the other lets the machine's load drift between them (the
same model read 25 to 57 ms in one table on a shared 2-core machine); calling them in turn,
round by round, exposes all of them to the same conditions. ``torch.utils.benchmark.Timer`` is
not used: each ``timeit`` call adds warm-up calls of its own and pins torch's thread count to
its ``num_threads`` argument, which breaks both the interleaving and the caller's thread setting.
CUDA work is synchronised around every call when a CUDA device is given.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["Timing", "interleaved", "time_call"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds of each timed call of one runner."""

    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


def _syncer(device: str | torch.device | None) -> Callable[[], None]:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def interleaved(
    runners: Mapping[str, Callable[[], object]], *, rounds: int = 20, warmup: int = 1,
    device: str | torch.device | None = None,
) -> dict[str, Timing]:
    """Time each runner ``rounds`` times, calling them in turn round by round.

    ``warmup`` untimed rounds come first (lazy initialisation, caches, allocator). ``device``:
    a CUDA device is synchronised before and after every timed call.
    """
    for name, value, minimum in (("rounds", rounds, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} is invalid; expected an int >= {minimum}")
    sync = _syncer(device)
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            sync()
            start = time.perf_counter()
            runners[n]()
            sync()
            times[n].append((time.perf_counter() - start) * 1000.0)
    return {n: Timing(tuple(v)) for n, v in times.items()}


def time_call(fn: Callable[[], object], *, rounds: int = 10, warmup: int = 2,
              device: str | torch.device | None = None) -> Timing:
    """``interleaved`` for a single runner."""
    return interleaved({"call": fn}, rounds=rounds, warmup=warmup, device=device)["call"]
