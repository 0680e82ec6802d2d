"""Latency of several models measured together: interleaved calls, medians.

Measuring models one after the other lets the machine's load drift between them (the same model
read 25 to 57 ms in one table); interleaving call by call exposes all to the same conditions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn


def torch_runner(model: nn.Module, image_size: int, *, seed: int = 0) -> Callable[[], object]:
    """A zero-argument call of ``model`` (eval mode, no grad) on one fixed random image."""
    model.eval()
    image = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(seed))

    @torch.inference_mode()
    def run() -> object:
        return model([image])

    return run


def interleaved_latency(runners: Mapping[str, Callable[[], object]], *, rounds: int = 20,
                        warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each runner, calling them in turn ``rounds`` times."""
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            t0 = time.perf_counter()
            runners[n]()
            times[n].append((time.perf_counter() - t0) * 1000.0)
    return {n: statistics.median(v) for n, v in times.items()}
