"""structkd: distil a large teacher detector into a small, fast student.

The public API, in the order of the data flow::

    build_detector / torchvision_detector / load_detector   the detectors
    Distiller(student, teacher, method="ssim")              one training step's losses
    build_method, register_method, DistillMethod            distillation methods as plugins
    fit(student, train, val, teacher=..., method=...)       a whole run on Lightning
"""

__version__ = "0.2.0"

from .distill import Distiller, FeatureTap
from .engine import RunResult, fit
from .methods import (
    DistillContext,
    DistillMethod,
    Level,
    build_method,
    describe_methods,
    register_method,
)
from .models import (
    DetectorSpec,
    build_detector,
    export_student,
    load_detector,
    torchvision_detector,
)

__all__ = [
    "DetectorSpec",
    "DistillContext",
    "DistillMethod",
    "Distiller",
    "FeatureTap",
    "Level",
    "RunResult",
    "__version__",
    "build_detector",
    "build_method",
    "describe_methods",
    "export_student",
    "fit",
    "load_detector",
    "register_method",
    "torchvision_detector",
]
