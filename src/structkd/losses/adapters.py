"""Connectors: per-level modules that map the student's features to the teacher's width.

They belong to the loss (trained with the student, dropped at inference), never to a detector.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTERS = ("conv1x1", "auto", "identity")


def make_adapter(student_channels: int, teacher_channels: int, kind: str, *,
                 level: str = "") -> nn.Module:
    """One connector.

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
