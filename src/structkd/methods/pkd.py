"""PKD: Pearson-correlation feature distillation (Cao et al., NeurIPS 2022).

Each channel of the (adapted) student and of the teacher is standardised to zero mean and unit
variance over (N, H, W), then ``L = weight * sum_levels MSE(S_hat, T_hat) / 2``, which equals
``1 - Pearson correlation`` per channel. As in the authors' MMRazor code the statistics pool the
whole batch (unbiased std, ``std + 1e-6``); with padded batches they pool the valid cells only,
and the MSE averages over valid elements. Because the statistics are batch-level, a padded
batch's loss equals the loss computed on the un-padded images pooled together (not per image).

Levels: the authors' configs distil four neck outputs, P3-P6 of RetinaNet (strides 8-64, not
P7) and P2-P5 of Faster R-CNN (strides 4-32, not P6): the presets' level sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..precision import fp32, no_autocast
from ._common import resolve_preset
from .base import DistillMethod
from .context import DistillContext, Level
from .registry import register_method

PRESETS = {"retinanet": {"weight": 10.0}, "fasterrcnn": {"weight": 6.0}}
PRESET_STRIDES = {"retinanet": (8, 16, 32, 64), "fasterrcnn": (4, 8, 16, 32)}
STD_EPS = 1e-6


def _standardise_sums(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (std + eps) of (B, C, H, W) over (B, H, W), valid cells only.

    The std is the unbiased one (as ``torch.std`` in MMRazor) where there are two cells or more;
    a single cell has std 0 (not NaN: the loss is then 0). Where a channel is constant its std
    is 0 with a zero gradient, as ``torch.std``'s backward gives (``sqrt``'s would be NaN).
    """
    dims = (0, 2, 3)
    if mask is None:
        n = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, correction=1 if n > 1 else 0)
    else:
        n = mask.sum()
        mean = (x * mask).sum(dim=dims, keepdim=True) / n
        var = (((x - mean) * mask) ** 2).sum(dim=dims, keepdim=True) / (n - 1).clamp_min(1)
    std = torch.where(var > 0, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt(),
                      torch.zeros_like(var))
    return mean, std + STD_EPS


def pkd_distance(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE / 2 between per-channel standardised maps; ``mask`` (B, 1, H, W) marks valid cells
    (computed in float32 like the maps, so its counts are exact)."""
    with no_autocast(student):
        s, t = fp32(student), fp32(teacher).to(fp32(student).dtype)
        if mask is not None:
            mask = mask.to(s.dtype)
        ms, ss = _standardise_sums(s, mask)
        mt, st = _standardise_sums(t, mask)
        diff = (s - ms) / ss - (t - mt) / st
        if mask is None:
            return diff.pow(2).mean() / 2
        return (diff * mask).pow(2).sum() / (mask.sum() * s.shape[1]) / 2


@register_method("pkd")
class PKD(DistillMethod):
    """Pearson correlation (per-channel standardised MSE) between student and teacher features.

    ``preset``: "retinanet" (weight 10, levels of strides 8-64) or "fasterrcnn" (weight 6,
    strides 4-32), MMRazor's COCO settings; ``weight`` overrides the preset. ``adapter``:
    "auto" (1x1 conv only where widths differ).
    """

    paper = ("Cao et al., PKD: General Distillation Framework for Object Detectors via Pearson "
             "Correlation Coefficient, NeurIPS 2022 (arXiv 2207.02039)")
    presets = PRESETS
    preset_strides = PRESET_STRIDES

    def __init__(
        self, levels: Sequence[Level] | Mapping[str, Level], *, preset: str = "retinanet",
        weight: float | None = None, adapter: str = "auto",
    ) -> None:
        opts = resolve_preset(PRESETS, preset, {"weight": weight})
        super().__init__(levels, weight=opts["weight"], adapter=adapter)
        self.preset = preset

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> Tensor:
        full = ctx.groups(name)[0].full
        return pkd_distance(student, teacher, None if full else ctx.valid_mask(name))
