"""L2 (mean squared error) feature distance: the paper's strongest pixel-wise baseline."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ._pair import ElementwiseDistance, elementwise_distance
from .options import NormalizeOptions


@NormalizeOptions.takes_options("student", "teacher")
def mse_distance(student: Tensor, teacher: Tensor, **options: Any) -> Tensor:
    """Mean squared difference of the min-max-rescaled maps (fp32); ``options`` are the fields
    of ``NormalizeOptions`` (normalize, eps, check_finite)."""
    return elementwise_distance(F.mse_loss, student, teacher, **options)


class MSELoss(ElementwiseDistance):
    """``mse_distance`` as a module, with the same normalisation options as ``SSIMLoss``."""

    reduce = staticmethod(F.mse_loss)
