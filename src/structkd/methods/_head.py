"""Pure tensor helpers shared by the head-level methods: the valid cells of a head level, boxes
compared around a common centre, and the stable binary cross-entropy with soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .context import DistillContext

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
