"""Training engine on Lightning: ``train``, ``distill`` and ``evaluate`` from a ``Config``."""

from .module import DetectionModule, lr_factor
from .run import RunResult, distill, evaluate, fit, load_detector, train

__all__ = [
    "DetectionModule", "RunResult", "distill", "evaluate", "fit", "load_detector", "lr_factor",
    "train",
]
