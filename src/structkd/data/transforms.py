"""Joint image/box augmentation pipelines built on ``torchvision.transforms.v2``.

No fixed-size resize happens here: detectors resize to their own min/max size when they batch
the images (``Detector.batch_path``), so a dataset-side resize would only cost quality.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def _check_scale_range(scale_range: tuple[float, float]) -> tuple[float, float]:
    """Return ``scale_range`` as floats, raising unless it is ``(low, high)``, 0 < low <= high."""
    try:
        lo, hi = (float(s) for s in scale_range)
    except (TypeError, ValueError) as e:
        raise ValueError(f"scale_range must be a pair (low, high), got {scale_range!r}") from e
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(
            f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}"
        )
    return lo, hi


class RandomScale(v2.Transform):
    """Resize image and boxes by a random factor drawn uniformly from ``scale_range``.

    Unlike ``v2.RandomResize`` (absolute size) or ``v2.ScaleJitter`` (relative to a target size)
    the factor is relative to the input, which keeps the dataset's own scale distribution.
    """

    def __init__(self, scale_range: tuple[float, float], antialias: bool = True) -> None:
        super().__init__()
        self.scale_range = _check_scale_range(scale_range)
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        factor = lo + float(torch.rand(())) * (hi - lo)
        size = [max(1, round(height * factor)), max(1, round(width * factor))]
        return {"size": size}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=self.antialias)


class RecordedHorizontalFlip(v2.RandomHorizontalFlip):
    """``v2.RandomHorizontalFlip`` that also writes whether it flipped into the target
    (``target["hflip"]``), so a teacher cache can hand over the levels of that variant. It
    draws exactly the random number its parent draws: runs are the same with either."""

    def forward(self, *inputs: Any) -> Any:
        state = torch.get_rng_state()
        flip = bool(torch.rand(1) < self.p)  # the parent's draw, peeked
        torch.set_rng_state(state)
        out = super().forward(*inputs)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            out = (out[0], {**out[1], "hflip": flip})
        return out


def build_transforms(
    train: bool,
    *,
    hflip_prob: float = 0.5,
    scale_range: tuple[float, float] = (1.0, 1.0),
) -> Callable:
    """Build the joint ``(image, target) -> (image, target)`` pipeline.

    Train: horizontal flip with ``hflip_prob`` (recorded as ``target["hflip"]``), random
    rescale by a factor in ``scale_range`` (skipped when it is ``(1, 1)``), then removal of
    boxes that became degenerate (with their labels). Val: only dtype (float32 in [0, 1]) and
    box format (XYXY) normalisation; ``hflip_prob`` and ``scale_range`` are ignored so one
    config can build both pipelines.
    """
    scale_range = _check_scale_range(scale_range)
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob!r}")
    ops: list[Callable] = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY),
    ]
    if train:
        if hflip_prob > 0:
            ops.append(RecordedHorizontalFlip(p=hflip_prob))
        if scale_range != (1.0, 1.0):
            ops.append(RandomScale(scale_range))
        ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(ops)
