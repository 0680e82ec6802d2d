"""Argument validation of the distance functions (clear ``ValueError`` messages); choices are
checked by ``structkd.checks.check_choice``."""

from __future__ import annotations

import torch
from torch import Tensor


def check_pair(student: Tensor, teacher: Tensor, *, check_finite: bool = True) -> None:
    """Check that two feature maps are float (B, C, H, W) tensors of equal shape."""
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}; expected a floating-point tensor")
        if t.dim() != 4:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} (rank {t.dim()}); expected rank 4 (B, C, H, W)"
            )
        if t.numel() == 0:
            raise ValueError(f"{name} has shape {tuple(t.shape)} with no elements")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}; "
            "use an adapter or resize so that both feature maps match"
        )
    if check_finite:
        for name, t in (("student", student), ("teacher", teacher)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf values")


def check_number(name: str, value: object) -> None:
    """``value`` must be a real number (an int or a float, not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r} must be a number")


def check_window(window_size: int, sigma: float) -> None:
    """The Gaussian window must be a positive odd size with a positive sigma."""
    check_number("sigma", sigma)
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise ValueError(f"window_size={window_size!r} must be an int")
    if window_size <= 0 or window_size % 2 == 0:
        raise ValueError(f"window_size={window_size} must be a positive odd integer")
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r} must be > 0")
