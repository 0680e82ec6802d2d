"""Distillation methods as plugins: one file per paper, a registry by name.

``build_method("ssim", levels)`` builds a method for paired levels; ``register_method`` adds
your own. Every method receives a :class:`DistillContext` and returns named, weighted loss terms.
"""

# isort: off
from . import imitation  # noqa: F401  (registered first: listed first)
from . import cwd, fgd, mgd, pkd  # noqa: F401
# isort: on
from ..losses.adapters import make_adapters
from .base import (
    ALIASES,
    METHODS,
    DistillContext,
    DistillMethod,
    Group,
    Level,
    MethodInfo,
    build_method,
    check_method_options,
    describe_methods,
    method_info,
    register_method,
    resolve_method,
)
from .cwd import CWD
from .fgd import FGD
from .imitation import FeatureImitation
from .mgd import MGD
from .pkd import PKD

__all__ = [
    "ALIASES",
    "CWD",
    "FGD",
    "METHODS",
    "MGD",
    "PKD",
    "DistillContext",
    "DistillMethod",
    "FeatureImitation",
    "Group",
    "Level",
    "MethodInfo",
    "build_method",
    "check_method_options",
    "describe_methods",
    "make_adapters",
    "method_info",
    "register_method",
    "resolve_method",
]
