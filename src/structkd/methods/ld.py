"""LD: localization distillation (Zheng et al., CVPR 2022), main distillation region.

Heads that predict each box edge as a distribution over R bins (GFL; YOLOv8 / YOLO11's DFL)
are distilled edge by edge: the student's distribution at temperature T mimics the teacher's,

    ld(a, e) = T^2 * (1/R) * sum_r q_t,r (log q_t,r - log q_s,r),  q = softmax(z / T)
    L = weight * sum_{a in M} w_a * (1/4) sum_e ld(a, e) / B

over the main region M, weighted by the student's own score w_a = max_k sigmoid(s_a,k)
(detached: GFL's weighting of its box losses, which LD follows), T = 10, weight 0.25 (the
authors' GFL configuration, which sums over M without further normalisation; structkd's losses
are batch means, hence 1/B). The authors' M is the student's positives under its own assigner;
structkd cannot see a family's assigner, so M is the assigners' shared candidate set: valid
locations whose centre lies inside a ground-truth box. The paper's second region (the
"valuable localization region", chosen by DIoU between anchors and boxes) is not distilled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..checks import check_positive
from ..precision import fp32, no_autocast
from ._head import valid_cells
from .base import DistillMethod
from .context import DistillContext, HeadLevel, Level
from .registry import register_method

__all__ = ["LD", "inside_boxes"]


def inside_boxes(head: HeadLevel, boxes: Sequence[Tensor]) -> Tensor:
    """(B, 1, 1, H, W) 1 where the location's centre lies strictly inside a box of its image
    (``boxes``: per image (n, 4) x1, y1, x2, y2 in batch pixels)."""
    centres = head.centres()  # (2, H, W)
    x, y = centres[0], centres[1]
    out = torch.zeros(len(boxes), 1, 1, *x.shape, dtype=x.dtype, device=x.device)
    for i, b in enumerate(boxes):
        if b.numel() == 0:
            continue
        b = b.to(x)
        hit = ((x[None] > b[:, 0, None, None]) & (x[None] < b[:, 2, None, None])
               & (y[None] > b[:, 1, None, None]) & (y[None] < b[:, 3, None, None])).any(0)
        out[i, 0, 0] = hit.to(x.dtype)
    return out


@register_method("ld")
class LD(DistillMethod):
    """Localization distillation: KL between the box-edge distributions, main region."""

    paper = ("Zheng et al., Localization Distillation for Dense Object Detection, CVPR 2022 "
             "(arXiv 2102.12252)")
    needs_head = "dense"
    needs_distribution = True
    needs_boxes = True
    uses_features = False
    supports = "heads with box distributions (DFL): YOLOv8, YOLO11"

    def __init__(self, levels: Sequence[Level] | Mapping[str, Level], *, weight: float = 0.25,
                 temperature: float = 10.0) -> None:
        super().__init__(levels, weight=weight)
        self.temperature = check_positive("temperature", temperature)

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> Tensor:
        assert ctx.student_head is not None and ctx.teacher_head is not None
        assert ctx.boxes is not None
        s, t = ctx.student_head[name], ctx.teacher_head[name]
        assert s.distribution is not None and t.distribution is not None
        with no_autocast(s.distribution):
            z_s = fp32(s.distribution)
            z_t = fp32(t.distribution).detach().to(z_s.dtype)
            tau = self.temperature
            log_q_s = (z_s / tau).log_softmax(dim=3)
            log_q_t = (z_t / tau).log_softmax(dim=3)
            kl = (log_q_t.exp() * (log_q_t - log_q_s)).mean(dim=3)  # (B, A, 4, H, W)
            ld = tau * tau * kl.mean(dim=2, keepdim=True)  # (B, A, 1, H, W)
            w = fp32(s.logits).detach().sigmoid().amax(dim=2, keepdim=True).to(ld.dtype)
            region = inside_boxes(s, ctx.boxes).to(ld) * valid_cells(ctx, name, ld)
            return (ld * w * region).sum() / ld.shape[0]
