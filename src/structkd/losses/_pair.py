"""Shared front end of the element-wise baselines: checks, fp32 upcast, min-max rescaling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_pair
from .normalize import DEFAULT_EPS, NORMALIZE_MODES, minmax_normalize


def normalized_pair(
    student: Tensor, teacher: Tensor, normalize: str | None, eps: float, check_finite: bool
) -> tuple[Tensor, Tensor]:
    """Validate, upcast to fp32 (fp64 stays fp64) and rescale both maps with their own stats."""
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_pair(student, teacher, check_finite=check_finite)
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return (
        minmax_normalize(student.to(dtype), normalize, eps),
        minmax_normalize(teacher.to(dtype), normalize, eps),
    )


class ElementwiseDistance(nn.Module):
    """Base of the element-wise baselines: subclasses set ``reduce`` (e.g. ``F.l1_loss``)."""

    reduce = staticmethod(F.l1_loss)

    def __init__(
        self, *, normalize: str | None = "minmax", eps: float = DEFAULT_EPS,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        check_choice("normalize", normalize, NORMALIZE_MODES)
        self.normalize, self.eps, self.check_finite = normalize, eps, check_finite

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = normalized_pair(student, teacher, self.normalize, self.eps, self.check_finite)
        return self.reduce(s, t)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize!r}"
