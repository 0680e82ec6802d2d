"""L1 feature distance: the paper's pixel-wise baseline."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._pair import ElementwiseDistance, normalized_pair
from .normalize import DEFAULT_EPS


def l1_distance(
    student: Tensor, teacher: Tensor, *, normalize: str | None = "minmax",
    eps: float = DEFAULT_EPS, check_finite: bool = True,
) -> Tensor:
    """Mean absolute difference of the min-max-rescaled maps (fp32)."""
    return F.l1_loss(*normalized_pair(student, teacher, normalize, eps, check_finite))


class L1Loss(ElementwiseDistance):
    """``l1_distance`` as a module, with the same normalisation options as ``SSIMLoss``."""

    reduce = staticmethod(F.l1_loss)
