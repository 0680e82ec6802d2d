"""Feature-distillation losses: pure tensor code with no knowledge of detectors.

One module per distance (``ssim``, ``l1``, ``mse``), each a function and an ``nn.Module`` taking
(student, teacher) maps of shape (B, C, H, W) and options declared once in a frozen dataclass
(``SSIMOptions``, ``NormalizeOptions``); ``registry`` builds a distance by name.
"""

from .l1 import L1Loss, l1_distance
from .mse import MSELoss, mse_distance
from .normalize import minmax_normalize
from .options import DistanceOptions, NormalizeOptions
from .registry import DISTANCES, build_distance, distance_options
from .ssim import SSIMLoss, SSIMOptions, gaussian_window, ssim_distance, ssim_map

__all__ = [
    "DISTANCES",
    "DistanceOptions",
    "L1Loss",
    "MSELoss",
    "NormalizeOptions",
    "SSIMLoss",
    "SSIMOptions",
    "build_distance",
    "distance_options",
    "gaussian_window",
    "l1_distance",
    "minmax_normalize",
    "mse_distance",
    "ssim_distance",
    "ssim_map",
]
