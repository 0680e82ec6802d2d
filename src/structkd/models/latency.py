"""Latency of a detector in its deployed path (resize, normalise, heads, post-processing).

:func:`torch_runner` is a zero-argument call of a PyTorch detector on one fixed image, for
``structkd.timing.interleaved`` (its ONNX twin is ``structkd.models.onnx.onnx_runner``);
:func:`measure_latency` is the median per-image latency of one detector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..timing import time_call

__all__ = ["measure_latency", "torch_runner"]


def torch_runner(model: nn.Module, image_size: int, *, seed: int = 0) -> Callable[[], object]:
    """A zero-argument call of ``model`` (eval mode, no grad) on one fixed random image.

    The image is ``image_size``² on CPU, values in ``[0, 1]``, the same for the same ``seed``
    (the image :func:`~structkd.models.onnx.onnx_runner` feeds ONNX Runtime). ``model`` is put
    in eval mode and left there.
    """
    model.eval()
    image = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(seed))

    @torch.inference_mode()
    def run() -> object:
        return model([image])

    return run


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
    The model is moved to ``device`` and its train/eval mode restored afterwards. Timed by
    :func:`structkd.timing.time_call`: ``warmup`` untimed calls, then ``iters`` timed calls of
    ``batch`` images each (a CUDA device is synchronised around each).
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
    try:
        timing = time_call(lambda: model(images), rounds=iters, warmup=warmup, device=device)
    finally:
        model.train(was_training)
    return timing.median_ms / batch
