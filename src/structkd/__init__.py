"""structkd: distil a large teacher detector into a small, fast student.

The public API, in the order of the data flow::

    detector(name | path, num_classes)                      a detector of any family
    build_detector / torchvision_detector / load_detector   the detectors, by kind
    Distiller(student, teacher, method="ssim")              one training step's losses
    build_method, register_method, DistillMethod            distillation methods as plugins
    fit(student, train, val, teacher=..., method=...)       a whole run on Lightning (objects)
    evaluate(model, dataset)                                COCO metrics (objects)
    load_config(path, overrides) / run_config(config)       the same from a YAML experiment
    calibrate_weight(distiller, batches)                    a weight by measurement ("auto")
    compare(config, ["none", "ssim", "mgd:auto"], seeds=3)  does it help on my data? a verdict
"""

from . import _openmp  # noqa: F401  (first: OpenMP reads its wait policy when torch loads)
from ._version import __version__
from .comparison import compare
from .distill import Distiller, FeatureTap, calibrate_weight
from .engine import (
    DetectionDataModule,
    DetectionModule,
    Loader,
    Optim,
    RunResult,
    Schedule,
    TrainerOptions,
    evaluate,
    fit,
)
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
    detector,
    export_student,
    load_detector,
    torchvision_detector,
)
from .recipes import Config, load_config, run_config

__all__ = [
    "Config",
    "DetectionDataModule",
    "DetectionModule",
    "DetectorSpec",
    "DistillContext",
    "DistillMethod",
    "Distiller",
    "FeatureTap",
    "Level",
    "Loader",
    "Optim",
    "RunResult",
    "Schedule",
    "TrainerOptions",
    "__version__",
    "build_detector",
    "build_method",
    "calibrate_weight",
    "compare",
    "describe_methods",
    "detector",
    "evaluate",
    "export_student",
    "fit",
    "load_config",
    "load_detector",
    "register_method",
    "run_config",
    "torchvision_detector",
]
