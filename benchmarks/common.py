"""What the step benchmarks share: their command-line options, a batch of random images with
boxes, and one timed training step. (Imported as ``common``: the scripts run as ``python
benchmarks/<name>.py``.)"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch


def step_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of every step benchmark: device, input size, batch, steps, threads, JSON."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode (interleaved)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results to this JSON file")
    return p


def random_samples(n: int, size: int, seed: int, device: str = "cpu") -> list:
    """``n`` (image, target) pairs: uniform noise images, three boxes of 7 classes each; targets
    carry ``image_id`` and an alternating ``hflip`` (what a teacher cache looks them up by)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = torch.rand(3, size, size, generator=g)
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(3, 2, generator=g) * size * 0.35
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        labels = torch.randint(1, 7, (3,), generator=g)
        out.append((image.to(device), {"boxes": boxes.to(device), "labels": labels.to(device),
                                       "image_id": i, "hflip": bool(i % 2)}))
    return out


def random_batch(n: int, size: int, seed: int, device: str = "cpu"):
    """``(images, targets)`` of :func:`random_samples`."""
    samples = random_samples(n, size, seed, device)
    return [s[0] for s in samples], [s[1] for s in samples]


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, batches: Sequence[Any],
               before: Callable[[Any], None] | None = None) -> Callable[[], None]:
    """One training step of ``net`` per call (forward, backward, optimiser step): the warm-up
    call on ``batches[0]``, timed call i on ``batches[i % len(batches)]``; ``before(batch)``
    runs first in each call (what a benchmark adds to the step)."""
    it = itertools.chain(batches[:1], itertools.cycle(batches))

    def step() -> None:
        batch = next(it)
        if before is not None:
            before(batch)
        losses = net(*batch)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    return step
