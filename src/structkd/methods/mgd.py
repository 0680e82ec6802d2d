"""MGD: masked generative distillation (Yang et al., ECCV 2022).

A random fraction ``mask_ratio`` of the (adapted) student's spatial positions is zeroed (one mask
for all channels), and a per-level generator (3x3 conv, ReLU, 3x3 conv at the teacher's width)
must regenerate the teacher's map from what is left:

    L = weight * sum_levels (1 / N) sum_{n,c,h,w} (G(M * S) - T)^2

``weight`` is the paper's alpha. With padding, each image's generator input and error cover its
valid cells only (the convolutions see zeros beyond them, as for the image alone). The mask is
drawn from torch's global generator on the features' device, so seeded runs repeat. Levels: all
five neck outputs for RetinaNet, P2-P5 (strides 4-32) for Faster R-CNN, as the authors' configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..precision import fp32, no_autocast
from ._common import resolve_preset
from .base import DistillMethod
from .connectors import generator
from .context import DistillContext, Level
from .registry import register_method

# The authors' configs: RetinaNet rx101 -> r50 and Cascade Mask R-CNN -> Faster R-CNN r50.
PRESETS = {
    "retinanet": {"weight": 2e-5, "mask_ratio": 0.65},
    "fasterrcnn": {"weight": 5e-7, "mask_ratio": 0.45},
}
PRESET_STRIDES = {"fasterrcnn": (4, 8, 16, 32)}  # RetinaNet: every level


def random_keep_mask(student: Tensor, mask_ratio: float) -> Tensor:
    """(B, 1, H, W) mask, 0 at a random ``mask_ratio`` of the positions, 1 elsewhere."""
    b, _, h, w = student.shape
    u = torch.rand(b, 1, h, w, device=student.device)
    return (u <= 1 - mask_ratio).to(student.dtype)


def mgd_distance(generated: Tensor, teacher: Tensor) -> Tensor:
    """Sum of squared errors divided by the number of images."""
    with no_autocast(generated):
        g = fp32(generated)
        return (g - fp32(teacher).to(g.dtype)).pow(2).sum() / g.shape[0]


@register_method("mgd")
class MGD(DistillMethod):
    """Masked generative distillation: regenerate the teacher's map from a masked student map.

    ``preset``: "retinanet" (weight 2e-5, mask_ratio 0.65, every level) or "fasterrcnn"
    (weight 5e-7, mask_ratio 0.45, strides 4-32), the authors' COCO configs; ``weight``
    (alpha) and ``mask_ratio`` override.
    """

    paper = ("Yang et al., Masked Generative Distillation, ECCV 2022 (arXiv 2205.01529)")
    presets = PRESETS
    preset_strides = PRESET_STRIDES

    def __init__(
        self, levels: Sequence[Level] | Mapping[str, Level], *, preset: str = "retinanet",
        weight: float | None = None, mask_ratio: float | None = None, adapter: str = "auto",
    ) -> None:
        opts = resolve_preset(PRESETS, preset, {"weight": weight, "mask_ratio": mask_ratio})
        super().__init__(levels, weight=opts["weight"], adapter=adapter)
        self.preset = preset
        self.mask_ratio = check_positive("mask_ratio", opts["mask_ratio"], allow_zero=True)
        if self.mask_ratio >= 1:
            raise ValueError(f"mask_ratio={self.mask_ratio!r} is invalid; expected [0, 1)")
        self.generators = nn.ModuleDict(
            {n: generator(lv.teacher_channels) for n, lv in self.levels.items()})

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> Tensor:
        s = student * random_keep_mask(student, self.mask_ratio) if self.mask_ratio > 0 \
            else student
        gen = self.generators[name]
        return ctx.mean_over_images(name, lambda s, t, g: mgd_distance(gen(s), t), student=s)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_ratio={self.mask_ratio:g}"
