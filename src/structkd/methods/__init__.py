"""Distillation methods as plugins: one file per paper, a registry by name.

``build_method("ssim", levels)`` builds a method for paired levels; ``register_method`` adds
your own. Every method receives a :class:`DistillContext` and returns named, weighted loss terms.
"""

# isort: off
from . import imitation  # noqa: F401  (registered first: listed first)
from . import cwd, fgd, mgd, pkd  # noqa: F401
from . import bckd, crosskd, detr_kd, ld, scoreweighted  # noqa: F401  (head-level methods after the feature ones)
# isort: on
from ..checks import check_choice, check_positive
from .base import DistillMethod
from .bckd import BCKD
from .connectors import ADAPTERS, GcBlock, generator, make_adapter, make_adapters
from .context import DistillContext, Group, HeadLevel, Level, QueryLayer
from .crosskd import CrossKD
from .cwd import CWD
from .detr_kd import DetrKD
from .fgd import FGD
from .imitation import FeatureImitation
from .ld import LD
from .mgd import MGD
from .pkd import PKD
from .registry import (
    ALIASES,
    DEFAULT_METHOD,
    METHODS,
    MethodInfo,
    build_method,
    check_method,
    describe_methods,
    method_info,
    method_names,
    register_method,
    resolve_method,
)
from .scoreweighted import ScoreWeighted

__all__ = [
    "ADAPTERS",
    "ALIASES",
    "BCKD",
    "CWD",
    "DEFAULT_METHOD",
    "FGD",
    "LD",
    "METHODS",
    "MGD",
    "PKD",
    "CrossKD",
    "DetrKD",
    "DistillContext",
    "DistillMethod",
    "FeatureImitation",
    "GcBlock",
    "Group",
    "HeadLevel",
    "Level",
    "MethodInfo",
    "QueryLayer",
    "ScoreWeighted",
    "build_method",
    "check_choice",
    "check_method",
    "check_positive",
    "describe_methods",
    "generator",
    "make_adapter",
    "make_adapters",
    "method_info",
    "method_names",
    "register_method",
    "resolve_method",
]
