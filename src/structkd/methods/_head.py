"""Pure tensor helpers shared by the head-level methods: the valid cells of a head level, boxes
compared around a common centre, and the stable binary cross-entropy with soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import fp32
from .context import DistillContext, HeadLevel

EPS = 1e-7  # IoU = (inter + EPS) / (union + EPS); GIoU's enclosing area + EPS


def valid_cells(ctx: DistillContext, name: str, like: Tensor) -> Tensor:
    """(B, 1, 1, H, W) 1 at cells holding image content, 0 at padding (dtype of ``like``),
    to broadcast over a head level's (B, A, C, H, W) tensors."""
    return ctx.valid_mask(name).to(like)[:, None]


def giou_ltrb(a: Tensor, b: Tensor, dim: int = 2) -> Tensor:
    """Generalised IoU of boxes given as distances (left, top, right, bottom) from one common
    centre (the same location's), along ``dim``: the centre cancels out. The IoU is
    ``(inter + eps) / (union + eps)``, so that two equal boxes of no area (a ReLU'd FCOS head
    predicts many) agree fully (GIoU 1), as boxes of any size do; at pixel areas the eps is
    negligible."""
    al, at, ar, ab = a.unbind(dim)
    bl, bt, br, bb = b.unbind(dim)
    area_a = (al + ar) * (at + ab)
    area_b = (bl + br) * (bt + bb)
    inter = (torch.minimum(al, bl) + torch.minimum(ar, br)).clamp(min=0) * (
        torch.minimum(at, bt) + torch.minimum(ab, bb)).clamp(min=0)
    union = area_a + area_b - inter
    iou = (inter + EPS) / (union + EPS)
    enclose = (torch.maximum(al, bl) + torch.maximum(ar, br)) * (
        torch.maximum(at, bt) + torch.maximum(ab, bb))
    return iou - (enclose - union) / (enclose + EPS)


def soft_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Element-wise BCE of sigmoid(``logits``) against soft targets in [0, 1] (stable form)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none")


def soft_positives(ctx: DistillContext, heads: dict[str, HeadLevel]) -> Tensor:
    """The teacher's soft count of positives, ``max(1, sum over valid locations and anchors
    of max_k sigmoid(logit))`` over the levels of ``heads`` (detached): the normaliser that
    stands in for a family's number of assigned positives."""
    count = None
    for name, head in heads.items():
        p_t = fp32(head.logits).detach().sigmoid()
        w = (p_t.amax(dim=2, keepdim=True) * valid_cells(ctx, name, p_t)).sum()
        count = w if count is None else count + w
    assert count is not None, "no levels"
    return count.clamp(min=1.0)


def gap_weighted_bce(logits: Tensor, p_t: Tensor, mask: Tensor, beta: float
                     ) -> tuple[Tensor, Tensor]:
    """``sum |p_t - p_s|^beta * BCE(p_s; p_t) * mask`` (the factor keeps its gradient, as in
    BCKD and CrossKD) and the gap |p_t - p_s| itself."""
    gap = (p_t - logits.sigmoid()).abs()
    factor = gap.pow(beta) if beta != 1.0 else gap
    return (factor * soft_bce(logits, p_t) * mask).sum(), gap
