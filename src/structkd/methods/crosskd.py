"""CrossKD: cross-head knowledge distillation (Wang et al., CVPR 2024), written from the paper.

The student's head features after its first ``cut`` layers (in each branch: classification and
box regression) go through the *teacher's* remaining head layers; those cross-head predictions
mimic the teacher's own, so the distillation target never conflicts with the student's own
head, which learns from the ground truth only. Gradients flow through the frozen teacher layers
back into the student. Per valid location (and anchor), with c = cross-head logits, t = the
teacher's, p = sigmoid:

    l_cls = sum_k |p_t - p_c|^beta * BCE(p_c; p_t)
    l_loc = w * (1 - GIoU(box_c, box_t)),   w = max_k p_t (detached)
    L = weight * (cls_weight * sum l_cls + loc_weight * sum l_loc) / N

N is the teacher's soft count of positives, ``max(1, sum of max_k p_t)`` (as in ``bckd``): the
box term is the confidence-weighted mean of 1 - GIoU.
Choices where the paper leaves them open or uses what structkd cannot see: beta = 1, the
teacher's confidence as the box weight, weights 1 and 1, and a trainable 1x1 convolution per
branch where the heads' widths differ (the paper's pairs share 256-channel heads). Default cut 3:
the paper's best on a 4-layer head. FCOS's centre-ness is not distilled. Heads: torchvision's
RetinaNet and FCOS, student and teacher of the same design.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from ..checks import check_positive
from ..precision import fp32, no_autocast
from ._head import gap_weighted_bce, giou_ltrb, soft_positives, valid_cells
from .base import DistillMethod
from .connectors import make_adapter
from .context import DistillContext, Level
from .registry import register_method

__all__ = ["CrossKD"]


@register_method("crosskd")
class CrossKD(DistillMethod):
    """Cross-head KD: the student's head features through the teacher's head layers."""

    paper = ("Wang et al., CrossKD: Cross-Head Knowledge Distillation for Object Detection, "
             "CVPR 2024 (arXiv 2306.11369)")
    needs_head = "dense"
    compares_classes = True
    uses_features = False
    supports = "torchvision RetinaNet and FCOS heads, student and teacher of one design"

    def __init__(self, levels: Sequence[Level] | Mapping[str, Level], *, weight: float = 1.0,
                 cut: int = 3, cls_weight: float = 1.0, loc_weight: float = 1.0,
                 beta: float = 1.0) -> None:
        super().__init__(levels, weight=weight)
        if not isinstance(cut, int) or isinstance(cut, bool) or cut < 0:
            raise ValueError(f"cut={cut!r}; expected an int >= 0 (the head layer after which "
                             "the student's features go through the teacher's head)")
        self.cross_cut = cut
        self.cls_weight = check_positive("cls_weight", cls_weight, allow_zero=True)
        self.loc_weight = check_positive("loc_weight", loc_weight, allow_zero=True)
        self.beta = check_positive("beta", beta, allow_zero=True)
        widths = {(lv.student_channels, lv.teacher_channels) for lv in self.levels.values()}
        if len(widths) != 1:
            raise ValueError(f"crosskd shares one adapter per head branch over the levels; the "
                             f"levels' widths differ: {sorted(widths)}")
        (cs, ct), = widths
        self.branch_adapters = nn.ModuleDict({b: make_adapter(cs, ct, "auto", level=b)
                                              for b in ("cls", "reg")})
        self._norm: Tensor | None = None

    def adapt(self, branch: str, x: Tensor) -> Tensor:
        """The student's head feature of ``branch`` at the teacher's width."""
        return self.branch_adapters[branch](x)

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        self.check_context(ctx)
        if ctx.cross_head is None:
            raise ValueError("crosskd needs the cross-head predictions in the context "
                             "(cross_head): build it through structkd's Distiller or wiring")
        assert ctx.teacher_head is not None
        with no_autocast(next(iter(ctx.teacher.values()))):
            self._norm = soft_positives(ctx, {n: ctx.teacher_head[n] for n in self.levels})
            try:
                return super().forward(ctx)
            finally:
                self._norm = None

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> dict[str, Tensor]:
        assert ctx.cross_head is not None and ctx.teacher_head is not None
        assert self._norm is not None
        c, t = ctx.cross_head[name], ctx.teacher_head[name]
        logits = fp32(c.logits)
        p_t = fp32(t.logits).detach().sigmoid().to(logits.dtype)
        mask = valid_cells(ctx, name, logits)
        cls, _ = gap_weighted_bce(logits, p_t, mask, self.beta)
        w = p_t.amax(dim=2) * mask[:, :, 0]
        giou = giou_ltrb(fp32(c.ltrb), fp32(t.ltrb).detach().to(logits.dtype))
        loc = (w * (1 - giou)).sum()
        return {"cls": self.cls_weight * cls / self._norm,
                "loc": self.loc_weight * loc / self._norm}
