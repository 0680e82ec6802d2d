"""FGD: focal and global distillation (Yang et al., CVPR 2022).

Per level, with the (adapted) student S and the teacher T of shape (C, H, W) per image:

* masks from the ground-truth boxes mapped to the level's cells: a box covers rows
  ``floor(y1 / s) .. ceil(y2 / s)`` and columns ``floor(x1 / s) .. ceil(x2 / s)`` (inclusive, as in
  the authors' code), and each covered cell gets ``1 / (rows * columns)`` of the smallest box over
  it (``M_fg``; rows and columns count the box's whole extent, also where it reaches past the
  map's border, as in the authors' code); every other cell gets ``1 / (number of such cells)``
  (``M_bg``, all 0 when there is none);
* attention of a map X: spatial ``A_s = H W softmax(mean_c |X| / temp)``, channel
  ``A_c = C softmax(mean_hw |X| / temp)``;
* focal term ``alpha * sum(M_fg A_s^T A_c^T (S - T)^2) + beta * sum(M_bg A_s^T A_c^T (S - T)^2)``
  with the teacher's attention;
* attention term ``gamma * (sum |A_c^S - A_c^T| + sum |A_s^S - A_s^T|)``;
* global term ``lambda * sum((S + F(S) - T - F'(T))^2)`` where F, F' are GcBlocks (context
  modelling: a 1x1 conv and spatial softmax pool the map to one vector, a bottleneck
  conv-LayerNorm-ReLU-conv transforms it, and it is added to every position). As in the authors'
  code the student and the teacher side have their own block, and both train.

Every sum is over one image and divided by the number of images. With padding, each image's
masks, softmaxes and context pooling cover its valid cells only. The authors' code maps boxes with
the *unpadded* image shape onto the padded map; here boxes are divided by the level's stride,
which is the same without padding and correct with it. Rows follow the box's y extent and
columns its x extent, as the paper's equations and the authors' code since January 2022 do
(their first commit filled the mask with the two axes swapped; commit c22b81d, 2022-01-04,
"fix bug", corrected it). Levels: all five neck outputs for RetinaNet and FCOS, P2-P5 (strides
4-32) for Faster R-CNN, as the authors' configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..precision import fp32, no_autocast
from ._common import resolve_preset
from .base import DistillMethod
from .connectors import GcBlock
from .context import DistillContext, Group, Level
from .registry import register_method

# The authors' COCO configs (yzd-v/FGD, configs/distillers/fgd).
PRESETS = {
    "retinanet": {"temperature": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4,
                  "lambda_": 5e-6},
    "fasterrcnn": {"temperature": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5,
                   "lambda_": 5e-7},
    "fcos": {"temperature": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4,
             "lambda_": 8e-6},
}
TERMS = ("fg", "bg", "attention", "global")
PRESET_STRIDES = {"fasterrcnn": (4, 8, 16, 32)}  # RetinaNet, FCOS: every level


def attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial (B, H, W) and channel (B, C) attention of a map, each summing to H W and C."""
    b, c, h, w = x.shape
    value = x.abs()
    spatial = F.softmax(value.mean(dim=1).reshape(b, -1) / temperature, dim=1)
    channel = F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return (h * w) * spatial.reshape(b, h, w), c * channel


def box_masks(boxes: Sequence[Tensor], height: int, width: int, *, device: torch.device,
              dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Foreground and background masks (B, H, W) from boxes in cells (x1, y1, x2, y2).

    No host synchronisation: the boxes' extents are compared with the cell indices on device.
    """
    rows = torch.arange(height, device=device, dtype=dtype).view(1, -1, 1)
    cols = torch.arange(width, device=device, dtype=dtype).view(1, 1, -1)
    fg = []
    for b in boxes:
        b = b.to(device=device, dtype=dtype).reshape(-1, 4)
        x0, y0 = b[:, 0].floor(), b[:, 1].floor()
        x1, y1 = b[:, 2].ceil(), b[:, 3].ceil()
        area = 1.0 / ((y1 + 1 - y0) * (x1 + 1 - x0))
        inside = ((rows >= y0.view(-1, 1, 1)) & (rows <= y1.view(-1, 1, 1))
                  & (cols >= x0.view(-1, 1, 1)) & (cols <= x1.view(-1, 1, 1)))
        per_box = inside.to(dtype) * area.view(-1, 1, 1)
        fg.append(per_box.amax(dim=0) if len(b) else torch.zeros(height, width, device=device,
                                                                 dtype=dtype))
    fg_mask = torch.stack(fg)
    bg = (fg_mask == 0).to(dtype)
    bg_mask = bg / bg.sum(dim=(1, 2), keepdim=True).clamp_min(1)
    return fg_mask, bg_mask


@register_method("fgd")
class FGD(DistillMethod):
    """Focal (foreground/background, attention-weighted) and global (GcBlock) distillation.

    ``preset``: "retinanet", "fasterrcnn" or "fcos", the authors' COCO settings for temperature
    and the four term weights (alpha: foreground, beta: background, gamma: attention, lambda_:
    global) and their level sets (every level; strides 4-32 for Faster R-CNN); any weight can
    be set to override the preset; ``weight`` scales all four. Needs the ground-truth boxes.
    """

    paper = ("Yang et al., Focal and Global Knowledge Distillation for Detectors, CVPR 2022 "
             "(arXiv 2111.11837)")
    needs_boxes = True
    presets = PRESETS
    preset_strides = PRESET_STRIDES

    def __init__(
        self, levels: Sequence[Level] | Mapping[str, Level], *, preset: str = "retinanet",
        temperature: float | None = None, alpha: float | None = None, beta: float | None = None,
        gamma: float | None = None, lambda_: float | None = None, weight: float = 1.0,
        adapter: str = "auto",
    ) -> None:
        opts = resolve_preset(PRESETS, preset, {
            "temperature": temperature, "alpha": alpha, "beta": beta, "gamma": gamma,
            "lambda_": lambda_})
        super().__init__(levels, weight=weight, adapter=adapter)
        self.preset = preset
        self.temperature = check_positive("temperature", opts["temperature"])
        self.term_weights = {
            term: check_positive(option, opts[option], allow_zero=True)
            for term, option in zip(TERMS, ("alpha", "beta", "gamma", "lambda_"), strict=True)
        }
        self.student_context = nn.ModuleDict(
            {n: GcBlock(lv.teacher_channels) for n, lv in self.levels.items()})
        self.teacher_context = nn.ModuleDict(
            {n: GcBlock(lv.teacher_channels) for n, lv in self.levels.items()})

    def _level(self, name: str, ctx: DistillContext, s: Tensor, t: Tensor, g: Group) -> Tensor:
        """The four unweighted terms, averaged over the group's images: a (4,) tensor."""
        with no_autocast(s):
            s32, t32 = fp32(s), fp32(t).to(fp32(s).dtype)
            b = s32.shape[0]
            sa_t, ca_t = attention(t32, self.temperature)
            sa_s, ca_s = attention(s32, self.temperature)
            fg, bg = box_masks(ctx.level_boxes(name, g.index), g.height, g.width,
                               device=s32.device, dtype=s32.dtype)
            weighted = (s32 - t32).pow(2) * sa_t[:, None] * ca_t[:, :, None, None]
            focal_fg = (weighted * fg[:, None]).sum() / b
            focal_bg = (weighted * bg[:, None]).sum() / b
            att = ((ca_s - ca_t).abs().sum() + (sa_s - sa_t).abs().sum()) / b
        # The context blocks run in the surrounding precision (they are trainable layers).
        out_s = self.student_context[name](s)
        out_t = self.teacher_context[name](t)
        with no_autocast(s):
            glob = (fp32(out_s) - fp32(out_t)).pow(2).sum() / b
        return torch.stack([focal_fg, focal_bg, att, glob.to(focal_fg.dtype)])

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> dict[str, Tensor]:
        terms = ctx.mean_over_images(
            name, lambda s, t, g: self._level(name, ctx, s, t, g), student=student)
        return {k: terms[i] * self.term_weights[k] for i, k in enumerate(TERMS)}

    def extra_repr(self) -> str:
        tw = ", ".join(f"{k}={v:g}" for k, v in self.term_weights.items())
        return f"{super().extra_repr()}, temperature={self.temperature:g}, {tw}"
