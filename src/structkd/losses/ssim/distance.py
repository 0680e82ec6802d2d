"""The public SSIM distance: ``ssim_distance`` and ``SSIMLoss``, mean((1 - SSIM) / 2).

Standard SSIM and contrast x structure run on the fused kernel (``fused``); other exponents on
the reference formula (``autograd``) with plain autograd.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...precision import compute_dtype, no_autocast
from .._checks import check_pair
from ..normalize import MinMaxStats, minmax_normalize
from .autograd import ssim_formula
from .fused import FusedSSIMDistance, fused_ssim
from .options import SSIMOptions


@SSIMOptions.takes_options("student", "teacher")
def ssim_distance(student: Tensor, teacher: Tensor, **options: Any) -> Tensor:
    """Mean of ``(1 - SSIM) / 2`` between two (B, C, H, W) maps, after min-max rescaling.

    ``options`` are the fields of ``SSIMOptions``. The result is in [0, 1]; 0 for identical
    maps. Computed and returned in fp32 (fp64 for fp64 inputs) even under autocast or with
    bf16/fp16 inputs.
    """
    return options_distance(student, teacher, SSIMOptions.from_kwargs(**options))


def options_distance(student: Tensor, teacher: Tensor, opts: SSIMOptions) -> Tensor:
    """``ssim_distance`` with its options already built and checked."""
    normalize, eps, check_finite = opts.normalize, opts.eps, opts.check_finite
    # With min-max on, non-finite values show up in the extremes, so skip the full scan.
    check_pair(student, teacher, check_finite=check_finite and normalize is None)
    dtype = compute_dtype(student)
    with no_autocast(student.device.type):
        x = student.to(dtype).contiguous()
        y = teacher.to(dtype).contiguous()
        if not opts.fused:
            zx, zy = minmax_normalize(x, normalize, eps), minmax_normalize(y, normalize, eps)
            if check_finite and normalize is not None:
                _check_finite_pair(zx, zy)
            return ((1 - ssim_formula(zx, zy, opts)) / 2).mean()
        grads = [torch.is_grad_enabled() and t.requires_grad for t in (x, y)]
        stats = [None, None]
        if normalize is not None:
            with torch.no_grad():
                stats = [MinMaxStats.of(t, normalize, eps, index=g)
                         for t, g in zip((x, y), grads, strict=True)]
            if check_finite:
                _check_finite_stats(stats)
        if any(grads):
            return FusedSSIMDistance.apply(x, y, opts, *stats)
        return fused_ssim(x, y, opts, *stats, False, False)[0]  # no gradient work


def _check_finite_stats(stats: list[MinMaxStats]) -> None:
    for name, s in zip(("student", "teacher"), stats, strict=True):
        if not bool(torch.isfinite(s.low).all() & torch.isfinite(s.high).all()):
            raise ValueError(f"{name} contains NaN or Inf values")


def _check_finite_pair(zx: Tensor, zy: Tensor) -> None:
    for name, z in (("student", zx), ("teacher", zy)):
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"{name} contains NaN or Inf values")


class SSIMLoss(nn.Module):
    """Structural distance ``mean((1 - SSIM) / 2)`` between student and teacher feature maps.

    Takes the fields of ``SSIMOptions`` as keyword arguments (kept in ``self.options``).
    ``normalize`` rescales each map to [0, 1] with its own statistics: per sample over (C, H, W)
    ("minmax", the default), per sample and channel ("minmax_channel"), or not at all (None;
    then set ``data_range`` to the features' dynamic range).
    """

    options_type: ClassVar[type[SSIMOptions]] = SSIMOptions

    @SSIMOptions.takes_options("self")
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = SSIMOptions.from_kwargs(**options)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return options_distance(student, teacher, self.options)

    def extra_repr(self) -> str:
        c = self.options
        return (
            f"window_size={c.window_size}, sigma={c.sigma}, padding={c.padding!r}, "
            f"components={c.components}, normalize={c.normalize!r}"
        )
