"""DETR-family logit distillation with Hungarian-matched teacher predictions as targets (the
logits part of DETRDistill, Chang et al., ICCV 2023).

For each decoder layer l of the student, paired with the teacher's layer at the same relative
depth (layer l to layer l when both are as deep), and each image, the student's queries are
matched one to one to the teacher's predictions (every teacher query, no threshold) by the
Hungarian algorithm on

    cost_ij = cost_class * sum_k BCE(s_ik; sigmoid(t_jk)) + cost_l1 * |b_i - b_j|_1
              + cost_giou * (-GIoU(b_i, b_j))

(boxes as (cx, cy, w, h) normalised by the batch; GIoU on their corners). Then, with N the
number of matched pairs in the batch:

    L_l = weight * (cls_weight * sum_i sum_k BCE(s_ik; y_ik) + l1_weight * sum_(i,j) |b_i - b_j|_1
                    + giou_weight * sum_(i,j) (1 - GIoU(b_i, b_j))) / N

y_i is the matched teacher query's sigmoid scores, 0 for a student query left unmatched (more
student than teacher queries). The losses are summed over the student's layers. Weights: the
authors' (class 1, L1 5, GIoU 2 for the loss and the matching cost alike). Sigmoid-classifier
DETRs: transformers' RT-DETR, RT-DETRv2, D-FINE, DEIMv2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..checks import check_positive
from ..precision import fp32, no_autocast
from .base import DistillMethod
from .context import DistillContext, Level
from .registry import register_method

__all__ = ["DetrKD", "corners", "giou_matrix", "paired_layers"]

EPS = 1e-7


def corners(boxes: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def giou_matrix(a: Tensor, b: Tensor) -> Tensor:
    """(n, m) generalised IoU of corner boxes a (n, 4) and b (m, 4)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = (inter + EPS) / (union + EPS)
    lt_c = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb_c = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    enclose = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (enclose - union) / (enclose + EPS)


def paired_layers(student: int, teacher: int) -> list[int]:
    """For each of ``student`` decoder layers, the teacher's layer at the same relative depth
    (the last with the last)."""
    return [max(0, round((i + 1) * teacher / student) - 1) for i in range(student)]


@register_method("detr_kd")
class DetrKD(DistillMethod):
    """Hungarian-matched teacher predictions as targets, per decoder layer (DETRDistill)."""

    paper = ("Chang et al., DETRDistill: A Universal Knowledge Distillation Framework for "
             "DETR-families, ICCV 2023 (arXiv 2211.10156): its Hungarian-matching logits "
             "distillation")
    needs_head = "detr"
    compares_classes = True
    uses_features = False
    supports = ("DETR decoders with sigmoid classifiers: RT-DETR, RT-DETRv2, D-FINE "
                "(transformers; DEIMv2 untested)")

    def __init__(self, levels: Sequence[Level] | Mapping[str, Level], *, weight: float = 1.0,
                 cls_weight: float = 1.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0) -> None:
        super().__init__(levels, weight=weight)
        self.cls_weight = check_positive("cls_weight", cls_weight, allow_zero=True)
        self.l1_weight = check_positive("l1_weight", l1_weight, allow_zero=True)
        self.giou_weight = check_positive("giou_weight", giou_weight, allow_zero=True)

    @torch.no_grad()
    def match(self, s_logits: Tensor, s_boxes: Tensor, t_scores: Tensor,
              t_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """One image's (student indices, teacher indices) of the optimal matching."""
        s_logits, s_boxes = s_logits.detach(), s_boxes.detach()
        # sum_k BCE(s_ik; y_jk) = sum_k softplus(s_ik) - s_ik * y_jk
        cost = (F.softplus(s_logits).sum(-1)[:, None] - s_logits @ t_scores.T) * self.cls_weight
        cost = cost + self.l1_weight * torch.cdist(s_boxes, t_boxes, p=1)
        cost = cost - self.giou_weight * giou_matrix(corners(s_boxes), corners(t_boxes))
        rows, cols = linear_sum_assignment(cost.cpu().double().numpy())
        dev = s_logits.device
        return torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        if ctx.student_queries is None or ctx.teacher_queries is None:
            raise ValueError("detr_kd needs both detectors' decoder predictions in the context "
                             "(student_queries, teacher_queries)")
        s_layers, t_layers = ctx.student_queries, ctx.teacher_queries
        ref = s_layers[0].logits
        totals = {"cls": ref.new_zeros(()), "l1": ref.new_zeros(()), "giou": ref.new_zeros(())}
        self.level_values = {}
        with no_autocast(ref):
            for i, j in enumerate(paired_layers(len(s_layers), len(t_layers))):
                s, t = s_layers[i], t_layers[j]
                logits, boxes = fp32(s.logits), fp32(s.boxes)
                t_scores = fp32(t.logits).detach().sigmoid().to(logits.dtype)
                t_boxes = fp32(t.boxes).detach().to(logits.dtype)
                target = torch.zeros_like(logits)
                cls = l1 = giou = logits.new_zeros(())
                matched = 0
                for b in range(logits.shape[0]):
                    rows, cols = self.match(logits[b], boxes[b], t_scores[b], t_boxes[b])
                    target[b, rows] = t_scores[b, cols]
                    sb, tb = boxes[b, rows], t_boxes[b, cols]
                    l1 = l1 + (sb - tb).abs().sum()
                    pair = giou_matrix(corners(sb), corners(tb)).diagonal()
                    giou = giou + (1 - pair).sum()
                    matched += len(rows)
                cls = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
                n = max(matched, 1)
                layer = {"cls": self.cls_weight * cls / n, "l1": self.l1_weight * l1 / n,
                         "giou": self.giou_weight * giou / n}
                for k, v in layer.items():
                    totals[k] = totals[k] + v
                self.level_values[f"layer{i}"] = sum(layer.values()).detach()
        return {f"distill/{k}": self.weight * v for k, v in totals.items()}
