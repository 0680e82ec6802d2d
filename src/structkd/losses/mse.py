"""L2 (mean squared error) feature distance: the paper's strongest pixel-wise baseline."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._pair import ElementwiseDistance, normalized_pair
from .normalize import DEFAULT_EPS


def mse_distance(
    student: Tensor, teacher: Tensor, *, normalize: str | None = "minmax",
    eps: float = DEFAULT_EPS, check_finite: bool = True,
) -> Tensor:
    """Mean squared difference of the min-max-rescaled maps (fp32)."""
    return F.mse_loss(*normalized_pair(student, teacher, normalize, eps, check_finite))


class MSELoss(ElementwiseDistance):
    """``mse_distance`` as a module, with the same normalisation options as ``SSIMLoss``."""

    reduce = staticmethod(F.mse_loss)
