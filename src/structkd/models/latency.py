"""Latency of a detector in its deployed path (resize, normalise, heads, post-processing)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["measure_latency"]


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    image_size: int,
    *,
    device: str | torch.device = "cpu",
    batch: int = 1,
    warmup: int = 2,
    iters: int = 10,
) -> float:
    """Median eval-mode latency in milliseconds per image on random ``image_size``² images.

    Includes torchvision's internal resize/normalise and post-processing (the deployed path).
    The model is moved to ``device`` and its train/eval mode restored afterwards.
    """
    for name, value, minimum in (
        ("image_size", image_size, 1),
        ("batch", batch, 1),
        ("warmup", warmup, 0),
        ("iters", iters, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} is invalid; expected an int >= {minimum}")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, image_size, image_size, generator=generator).to(device) for _ in range(batch)
    ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[float] = []
    try:
        for step in range(warmup + iters):
            sync()
            start = time.perf_counter()
            model(images)
            sync()
            if step >= warmup:
                times.append((time.perf_counter() - start) * 1000.0 / batch)
    finally:
        model.train(was_training)
    return statistics.median(times)
