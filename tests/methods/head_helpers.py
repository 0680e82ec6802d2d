"""Shared helpers of the head-level method tests: random paired features and head outputs
(float64), a context holding them, and the NumPy reference module
(``tests/golden/head_reference.py``, which never imports structkd)."""

from __future__ import annotations

import numpy as np
import torch
from method_helpers import _load
from torch import Tensor

from structkd.methods import DistillContext, HeadLevel, Level

F64 = torch.float64
LEVELS = [Level("s8", 8, 4, 6), Level("s16", 16, 4, 6)]
SHAPES = {"s8": (6, 7), "s16": (3, 4)}
B, K, BINS = 2, 3, 8


def reference():
    """The NumPy references (loaded by path, as the other golden modules are)."""
    return _load("structkd_tests_head_reference", "head_reference.py")


def head(stride: int, shape: tuple[int, int], gen: torch.Generator, *, anchors: int = 1,
         bins: int = 0, aux: bool = False, quality: bool = False, grad: bool = False,
         offset: float = 0.5) -> HeadLevel:
    h, w = shape

    def r(*s: int, scale: float = 1.0, positive: bool = False) -> Tensor:
        x = torch.randn(*s, generator=gen, dtype=F64) * scale
        x = x.abs() + 0.1 if positive else x
        return x.requires_grad_(grad)

    dist = r(B, anchors, 4, bins, h, w, scale=2.0) if bins else None
    if dist is not None:  # distances as the distribution's expectation, as DFL heads decode
        bins_t = torch.arange(bins, dtype=F64).view(1, 1, 1, -1, 1, 1)
        ltrb = (dist.softmax(dim=3) * bins_t).sum(3) * stride
    else:
        ltrb = r(B, anchors, 4, h, w, scale=2.0 * stride, positive=True)
    return HeadLevel(stride, r(B, anchors, K, h, w, scale=2.0), ltrb, offset=offset,
                     distribution=dist, quality=r(B, anchors, 1, h, w) if quality else None,
                     aux_logits=r(B, anchors, K, h, w, scale=2.0) if aux else None)


def context(seed: int = 0, **options) -> DistillContext:
    """Student and teacher features and heads at two levels; the student's with gradient."""
    gen = torch.Generator().manual_seed(seed)
    student, teacher, s_head, t_head = {}, {}, {}, {}
    for lv in LEVELS:
        h, w = SHAPES[lv.name]
        student[lv.name] = torch.randn(B, lv.student_channels, h, w, generator=gen,
                                       dtype=F64).requires_grad_(True)
        teacher[lv.name] = torch.randn(B, lv.teacher_channels, h, w, generator=gen, dtype=F64)
        s_head[lv.name] = head(lv.stride, (h, w), gen, grad=True, **options)
        t_head[lv.name] = head(lv.stride, (h, w), gen, **options)
    return DistillContext(student, teacher, {lv.name: lv for lv in LEVELS},
                          batch_shape=(48, 56), student_head=s_head, teacher_head=t_head)


def np_(x: Tensor | None) -> np.ndarray | None:
    return None if x is None else x.detach().numpy()
