"""Feature-distillation losses: pure tensor code with no knowledge of detectors.

One file per distance (``ssim``, ``l1``, ``mse``), each a function and an ``nn.Module`` taking
(student, teacher) maps of shape (B, C, H, W); ``FeatureDistillLoss`` combines them over levels.
"""

from .feature import DISTANCES, FeatureDistillLoss, build_distance
from .l1 import L1Loss, l1_distance
from .mse import MSELoss, mse_distance
from .normalize import minmax_normalize
from .ssim import SSIMLoss, gaussian_window, ssim_distance, ssim_map

__all__ = [
    "DISTANCES",
    "FeatureDistillLoss",
    "L1Loss",
    "MSELoss",
    "SSIMLoss",
    "build_distance",
    "gaussian_window",
    "l1_distance",
    "minmax_normalize",
    "mse_distance",
    "ssim_distance",
    "ssim_map",
]
