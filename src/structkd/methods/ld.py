"""LD: localization distillation (Zheng et al., CVPR 2022): the main distillation region and the
valuable localization region.

Heads that predict each box edge as a distribution over R bins (GFL; YOLOv8 / YOLO11's DFL)
are distilled edge by edge: the student's distribution at temperature T mimics the teacher's,

    ld(a, e) = T^2 * (1/R) * sum_r q_t,r (log q_t,r - log q_s,r),  q = softmax(z / T)
    L = weight * sum_{a in M} w_a * (1/4) sum_e ld(a, e) / B

over the main region M, weighted by the student's own score w_a = max_k sigmoid(s_a,k)
(detached: GFL's weighting of its box losses, which LD follows), T = 10, weight 0.25 (the
authors' GFL configuration, which sums over M without further normalisation; structkd's losses
are batch means, hence 1/B). The authors' M is the student's positives under its own assigner;
structkd cannot see a family's assigner, so M is the assigners' shared candidate set: valid
locations whose centre lies inside a ground-truth box.

The valuable localization region V (the paper's second region, at ``vlr_weight`` times the
main region's weight: 1, both 0.25 in the authors' configuration):
every location has a virtual square anchor of side ``anchor_scale`` (8) strides; per
ground-truth box g, t_g = mean + std of IoU(anchor, g) over the ``topk`` (9) locations per
level nearest g's centre (ATSS's threshold); a valid location outside M is in V where
``gamma`` t_g <= DIoU(anchor, g) < t_g for some g (gamma 0.25), weighted by the largest such
IoU(anchor, g). Its term is ``weight * vlr_weight * sum_{a in V} v_a (1/16) sum_e ld(a, e) / B``
(the authors' 1/16). Terms: ``distill/main``, ``distill/vlr``.
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

__all__ = ["LD", "inside_boxes", "vlr_weights"]


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


def _iou_diou(anchors: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """(N, M) IoU and DIoU of corner boxes ``anchors`` (N, 4) and ``boxes`` (M, 4)."""
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = torch.maximum(anchors[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(anchors[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))
    ca = (anchors[:, :2] + anchors[:, 2:]) / 2
    cb = (boxes[:, :2] + boxes[:, 2:]) / 2
    rho2 = ((ca[:, None] - cb[None]) ** 2).sum(-1)
    lt_c = torch.minimum(anchors[:, None, :2], boxes[None, :, :2])
    rb_c = torch.maximum(anchors[:, None, 2:], boxes[None, :, 2:])
    c2 = ((rb_c - lt_c) ** 2).sum(-1)
    return iou, iou - rho2 / c2.clamp(min=1e-12)


@torch.no_grad()
def vlr_weights(heads: Sequence[HeadLevel], boxes: Sequence[Tensor], main: Sequence[Tensor],
                valid: Sequence[Tensor], *, gamma: float = 0.25, anchor_scale: float = 8.0,
                topk: int = 9) -> list[Tensor]:
    """Per level, (B, 1, 1, H, W) the weight v_a of each location in the valuable localization
    region (0 outside it): see the module. ``main`` and ``valid``: per level, (B, 1, 1, H, W)
    the main region and the valid cells."""
    out = [torch.zeros_like(m) for m in main]
    grids = []
    for h in heads:
        c = h.centres().flatten(1).T  # (HW, 2) x, y
        half = anchor_scale * h.stride / 2
        grids.append((c, torch.cat([c - half, c + half], dim=1)))
    for b, gt in enumerate(boxes):
        if gt.numel() == 0:
            continue
        gt = gt.to(grids[0][0])
        centre = (gt[:, :2] + gt[:, 2:]) / 2
        candidates = []
        for c, anchors in grids:
            k = min(topk, c.shape[0])
            dist = torch.cdist(c, centre)  # (HW, M)
            order = torch.sort(dist, dim=0, stable=True).indices[:k]  # (k, M)
            iou, _ = _iou_diou(anchors, gt)
            candidates.append(iou.gather(0, order))
        cand = torch.cat(candidates)  # (K, M)
        threshold = cand.mean(0) + cand.std(0)  # ATSS: mean + unbiased std per box
        for level, (_, anchors) in enumerate(grids):
            iou, diou = _iou_diou(anchors, gt)
            hit = (diou >= gamma * threshold) & (diou < threshold)
            best = torch.where(hit, iou, torch.full_like(iou, -1.0)).amax(dim=1)  # (HW,)
            keep = valid[level][b].flatten() * (1 - main[level][b].flatten())
            v = torch.where(best >= 0, best, torch.zeros_like(best)) * keep
            out[level][b] = v.view(out[level][b].shape)
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
                 temperature: float = 10.0, vlr_weight: float = 1.0, gamma: float = 0.25,
                 anchor_scale: float = 8.0, topk: int = 9) -> None:
        super().__init__(levels, weight=weight)
        self.temperature = check_positive("temperature", temperature)
        self.vlr_weight = check_positive("vlr_weight", vlr_weight, allow_zero=True)
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.anchor_scale = check_positive("anchor_scale", anchor_scale)
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 2:
            raise ValueError(f"topk={topk!r}; expected an int >= 2 (ATSS's candidates per level)")
        self.topk = topk
        self._vlr: dict[str, Tensor] = {}

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        self.check_context(ctx)
        assert ctx.student_head is not None and ctx.boxes is not None
        self._vlr = {}
        if self.vlr_weight > 0:
            names = list(self.levels)
            heads = [ctx.student_head[n] for n in names]
            main = [inside_boxes(h, ctx.boxes) for h in heads]
            valid = [valid_cells(ctx, n, m) for n, m in zip(names, main, strict=True)]
            weights = vlr_weights(heads, ctx.boxes, main, valid, gamma=self.gamma,
                                  anchor_scale=self.anchor_scale, topk=self.topk)
            self._vlr = dict(zip(names, weights, strict=True))
        try:
            return super().forward(ctx)
        finally:
            self._vlr = {}

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> dict[str, Tensor]:
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
            ld = tau * tau * kl.mean(dim=2, keepdim=True)  # (B, A, 1, H, W): (1/4) sum_e
            w = fp32(s.logits).detach().sigmoid().amax(dim=2, keepdim=True).to(ld.dtype)
            region = inside_boxes(s, ctx.boxes).to(ld) * valid_cells(ctx, name, ld)
            b = ld.shape[0]
            terms = {"main": (ld * w * region).sum() / b}
            if name in self._vlr:  # (1/16) sum_e = (1/4) of the edges' mean
                terms["vlr"] = self.vlr_weight * (ld * self._vlr[name].to(ld)).sum() / (4 * b)
            return terms
