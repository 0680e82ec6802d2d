"""What ``fit`` checks of a dataset before any work: its first sample has the structure a
detector trains on, or the error says what is wrong with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["check_first_sample"]


def check_first_sample(dataset: Dataset, role: str) -> None:
    """``dataset[0]`` must be ``(image, target)``: a float (3, H, W) tensor and a mapping with
    ``boxes`` (N, 4) and ``labels`` (N,) of ints 1..K (and an ``image_id`` for validation). The
    global random state is left as it was (a training transform draws from it)."""
    where = f"the {role} dataset ({type(dataset).__name__})"
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{where} has no length; expected a map-style dataset of "
                         "(image, target) pairs") from None
    if n == 0:
        raise ValueError(f"{where} is empty")
    with torch.random.fork_rng(devices=[]):
        sample = dataset[0]
    problem = _problem(sample, role)
    if problem:
        raise ValueError(f"{where}: item 0 {problem}; expected (image, target) with image a float "
                         "tensor (3, H, W) and target a dict of 'boxes' (N, 4, x1 y1 x2 y2 in "
                         "pixels) and 'labels' (N,) in 1..K" +
                         (" and 'image_id'" if role == "val" else ""))


def _problem(sample: Any, role: str) -> str | None:
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        return f"is {_show(sample)}, not an (image, target) pair"
    image, target = sample
    if not isinstance(image, torch.Tensor):
        return f"has an image of type {type(image).__name__}, not a tensor"
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        return f"has an image of shape {tuple(image.shape)} and dtype {image.dtype}"
    if not isinstance(target, Mapping):
        return f"has a target of type {type(target).__name__}, not a dict"
    missing = [k for k in ("boxes", "labels", *(("image_id",) if role == "val" else ()))
               if k not in target]
    if missing:
        return f"has a target without {missing} (keys: {sorted(target)})"
    boxes, labels = torch.as_tensor(target["boxes"]), torch.as_tensor(target["labels"])
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        return f"has 'boxes' of shape {tuple(boxes.shape)}"
    if labels.shape != (boxes.shape[0],) or labels.is_floating_point():
        return (f"has 'labels' of shape {tuple(labels.shape)} and dtype {labels.dtype} for "
                f"{boxes.shape[0]} boxes")
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
