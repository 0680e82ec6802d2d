"""Shared front end of the element-wise baselines: checks, fp32 upcast, min-max rescaling."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_pair
from .normalize import minmax_normalize
from .options import NormalizeOptions


def normalized_pair(
    student: Tensor, teacher: Tensor, options: NormalizeOptions
) -> tuple[Tensor, Tensor]:
    """Validate, upcast to fp32 (fp64 stays fp64) and rescale both maps with their own stats."""
    check_pair(student, teacher, check_finite=options.check_finite)
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return (
        minmax_normalize(student.to(dtype), options.normalize, options.eps),
        minmax_normalize(teacher.to(dtype), options.normalize, options.eps),
    )


class ElementwiseDistance(nn.Module):
    """Base of the element-wise baselines: subclasses set ``reduce`` (e.g. ``F.l1_loss``).

    Takes the fields of ``NormalizeOptions`` as keyword arguments.
    """

    options_type: ClassVar[type[NormalizeOptions]] = NormalizeOptions
    reduce = staticmethod(F.l1_loss)

    @NormalizeOptions.takes_options("self")
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = NormalizeOptions.from_kwargs(**options)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return self.reduce(*normalized_pair(student, teacher, self.options))

    def extra_repr(self) -> str:
        return f"normalize={self.options.normalize!r}"


def elementwise_distance(reduce, student: Tensor, teacher: Tensor, **options: Any) -> Tensor:
    """``reduce`` (e.g. ``F.l1_loss``) of the two rescaled maps; ``options`` as for the module."""
    return reduce(*normalized_pair(student, teacher, NormalizeOptions.from_kwargs(**options)))
