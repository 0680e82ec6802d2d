"""BCKD: bridging cross-task protocol inconsistency (Yang et al., ICCV 2023).

Dense detectors classify with one sigmoid per class, so the classification is distilled as K
binary problems (not a softmax KL), and the boxes by an IoU loss between the decoded boxes. At
every valid location (every anchor), with p_s = sigmoid(student logits), p_t = sigmoid(teacher):

    l_cls = sum_k |p_t - p_s|^beta * BCE(p_s; p_t)          (the factor keeps its gradient)
    l_loc = max_k |p_t - p_s| * (1 - GIoU(box_s, box_t))     (the factor is a detached weight)
    L = weight * (cls_weight * sum l_cls + loc_weight * sum l_loc) / N

beta = 1, cls_weight = 1, loc_weight = 4 (the authors' GFL configuration). The authors divide by
the student's number of positive anchors; structkd cannot see a family's assigner, so N is the
teacher's soft count of positives, ``max(1, sum over valid locations of max_k p_t)``: the
same scale (one per confident detection), the same for every family. No ground truth is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ..checks import check_positive
from ..precision import fp32, no_autocast
from ._head import gap_weighted_bce, giou_ltrb, soft_positives, valid_cells
from .base import DistillMethod
from .context import DistillContext, Level
from .registry import register_method

__all__ = ["BCKD"]


@register_method("bckd")
class BCKD(DistillMethod):
    """Binary classification KD + IoU-based localisation KD on the dense heads' outputs."""

    paper = ("Yang et al., Bridging Cross-task Protocol Inconsistency for Distillation in "
             "Dense Object Detection, ICCV 2023 (arXiv 2308.14286)")
    needs_head = "dense"
    compares_classes = True
    uses_features = False
    supports = "dense heads: RetinaNet, FCOS (torchvision), YOLOv8 / YOLO11 / YOLO26"

    def __init__(self, levels: Sequence[Level] | Mapping[str, Level], *, weight: float = 1.0,
                 cls_weight: float = 1.0, loc_weight: float = 4.0, beta: float = 1.0) -> None:
        super().__init__(levels, weight=weight)
        self.cls_weight = check_positive("cls_weight", cls_weight, allow_zero=True)
        self.loc_weight = check_positive("loc_weight", loc_weight, allow_zero=True)
        self.beta = check_positive("beta", beta, allow_zero=True)
        self._norm: Tensor | None = None

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        self.check_context(ctx)
        assert ctx.teacher_head is not None
        with no_autocast(next(iter(ctx.teacher.values()))):
            self._norm = soft_positives(ctx, {n: ctx.teacher_head[n] for n in self.levels})
            try:
                return super().forward(ctx)
            finally:
                self._norm = None

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> dict[str, Tensor]:
        assert ctx.student_head is not None and ctx.teacher_head is not None
        assert self._norm is not None
        s, t = ctx.student_head[name], ctx.teacher_head[name]
        s_logits = fp32(s.logits)
        p_t = fp32(t.logits).detach().sigmoid().to(s_logits.dtype)
        mask = valid_cells(ctx, name, s_logits)
        cls, gap = gap_weighted_bce(s_logits, p_t, mask, self.beta)
        u = gap.detach().amax(dim=2)  # (B, A, H, W)
        giou = giou_ltrb(fp32(s.ltrb), fp32(t.ltrb).detach().to(s_logits.dtype))
        loc = (u * (1 - giou) * mask[:, :, 0]).sum()
        return {"cls": self.cls_weight * cls / self._norm,
                "loc": self.loc_weight * loc / self._norm}


