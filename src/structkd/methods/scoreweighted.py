"""Score-weighted feature distillation: Ultralytics' own detector distillation (``distill_model``,
8.4.77+), written from its description so that structkd's engine and Ultralytics' trainer can run
the same loss side by side.

Per level l the student's head-input map goes through a projector P_l (1x1 conv to the teacher's
width, ReLU, 1x1 conv; PyTorch's default initialisation) and is compared with the teacher's map
location by location, weighted by the teacher's confidence there, w = max over classes (and
anchors) of sigmoid(teacher logit) (an end-to-end head such as YOLO26's: of the mean of its
one-to-many and one-to-one logits):

    L = weight * sum_l sum_nchw w_nhw (P_l(S) - T)_nchw^2 / (C_l * sum_nhw w_nhw + 1e-9)

``weight`` is Ultralytics' ``dis`` (default 6.0). Ultralytics multiplies the term by the batch
size because its detection losses are sums over the batch; structkd's detection losses are batch
means, so the factor is left out here (the Ultralytics integration puts it back). Padded cells
get no weight. The confidence is the teacher's class score without FCOS's centre-ness factor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from ..precision import fp32, no_autocast
from .base import DistillMethod
from .context import DistillContext, HeadLevel, Level
from .registry import register_method

EPS = 1e-9  # Ultralytics' guard in the denominator


def projector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """Ultralytics' projector: 1x1 conv, ReLU, 1x1 conv (default initialisation)."""
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1), nn.ReLU(),
                         nn.Conv2d(teacher_channels, teacher_channels, 1))


def confidence(head: HeadLevel) -> Tensor:
    """(B, 1, H, W) the teacher's confidence per location: max over anchors and classes of the
    sigmoid of its class logits (the mean of both branches' logits where it has two)."""
    logits = fp32(head.logits)
    if head.aux_logits is not None:
        logits = (logits + fp32(head.aux_logits)) / 2
    return logits.sigmoid().amax(dim=(1, 2))[:, None]


def score_weighted_l2(student: Tensor, teacher: Tensor, weight: Tensor) -> Tensor:
    """sum(w * (s - t)^2) / (C * sum(w) + 1e-9) for (B, C, H, W) maps and (B, 1, H, W) w."""
    with no_autocast(student):
        s = fp32(student)
        t = fp32(teacher).to(s.dtype)
        w = weight.to(s.dtype)
        return ((s - t).pow(2) * w).sum() / (w.sum() * s.shape[1] + EPS)


@register_method("scoreweighted")
class ScoreWeighted(DistillMethod):
    """Ultralytics' distillation: projected features, L2 weighted by the teacher's confidence."""

    paper = ("Ultralytics distill_model (ultralytics 8.4.77+, PR #24894): score-weighted L2 "
             "on the Detect head's inputs")
    needs_head = "dense"
    uses_features = False  # its own projectors, not the base's adapters
    supports = "dense heads: RetinaNet, FCOS (torchvision), YOLOv8 / YOLO11 / YOLO26"

    def __init__(self, levels: Sequence[Level] | Mapping[str, Level], *,
                 weight: float = 6.0) -> None:
        super().__init__(levels, weight=weight)
        self.projectors = nn.ModuleDict({
            n: projector(lv.student_channels, lv.teacher_channels)
            for n, lv in self.levels.items()})

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> Tensor:
        assert ctx.teacher_head is not None
        w = confidence(ctx.teacher_head[name]).detach()
        w = w * ctx.valid_mask(name).to(w)
        return score_weighted_l2(self.projectors[name](student), teacher, w)
