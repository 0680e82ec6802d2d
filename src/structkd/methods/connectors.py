"""Connectors: the trainable parts a method adds beside the student (as MMRazor keeps them).

1x1 adapters map a student level to the teacher's width (the SSIM paper's adaptation layer,
PKD/CWD/MGD/FGD's "align" convolutions), MGD's generators regenerate the teacher's map, FGD's
global-context blocks model context. They belong to the method, train with the student and are
dropped at export; none belongs to a detector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ADAPTERS", "GcBlock", "generator", "make_adapter", "make_adapters"]

ADAPTERS = ("conv1x1", "auto", "identity")


def make_adapter(student_channels: int, teacher_channels: int, kind: str, *,
                 level: str = "") -> nn.Module:
    """One connector from ``student_channels`` to ``teacher_channels``.

    ``"conv1x1"``: a trainable 1x1 convolution, initialised to the identity where the widths
    match (the paper's adaptation layer). ``"auto"``: a 1x1 convolution only where the widths
    differ, else nothing (PKD, CWD, MGD and FGD do this in their authors' code). ``"identity"``:
    nothing; the widths must match.
    """
    if kind not in ADAPTERS:
        raise ValueError(f"adapter={kind!r} is not supported; expected one of {ADAPTERS}")
    cin, cout = student_channels, teacher_channels
    if kind == "identity" or (kind == "auto" and cin == cout):
        if cin != cout:
            raise ValueError(
                f"adapter='identity' needs equal channels, but level {level!r} has "
                f"student {cin} vs teacher {cout}; use adapter='conv1x1' or 'auto'"
            )
        return nn.Identity()
    conv = nn.Conv2d(cin, cout, kernel_size=1)
    if kind == "conv1x1" and cin == cout:
        with torch.no_grad():
            conv.weight.copy_(torch.eye(cin).view(cin, cin, 1, 1))
            conv.bias.zero_()
    return conv


def make_adapters(channels: dict[str, tuple[int, int]], kind: str) -> nn.ModuleDict:
    """A ``ModuleDict`` of connectors, one per level: ``{level: (student, teacher) channels}``."""
    return nn.ModuleDict({name: make_adapter(s, t, kind, level=name)
                          for name, (s, t) in channels.items()})


def generator(channels: int) -> nn.Sequential:
    """MGD's generation block: conv3x3 - ReLU - conv3x3, at the teacher's width."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


class GcBlock(nn.Module):
    """FGD's global context block: attention-pooled context, transformed, added to every
    position (a 1x1 conv and a spatial softmax pool the map to one vector, a bottleneck
    conv-LayerNorm-ReLU-conv transforms it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.context_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        # The authors' initialisation: Kaiming (fan-in) pooling conv, zero last conv, so the
        # block starts as the identity.
        nn.init.kaiming_normal_(self.context_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        weights = F.softmax(self.context_mask(x).reshape(b, 1, -1), dim=2)  # (B, 1, HW)
        context = torch.bmm(x.reshape(b, c, -1), weights.transpose(1, 2))  # (B, C, 1)
        return x + self.transform(context.reshape(b, c, 1, 1))
