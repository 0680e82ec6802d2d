"""Distillation methods as plugins: one file per paper, a registry by name.

``build_method("ssim", levels)`` builds a method for paired levels; ``register_method`` adds
your own. Every method receives a :class:`DistillContext` and returns named, weighted loss terms.
"""

# isort: off
from . import imitation  # noqa: F401  (registered first: listed first)
from . import cwd, fgd, mgd, pkd  # noqa: F401
# isort: on
from ..checks import check_choice, check_positive
from .base import DistillMethod
from .connectors import ADAPTERS, GcBlock, generator, make_adapter, make_adapters
from .context import DistillContext, Group, Level
from .cwd import CWD
from .fgd import FGD
from .imitation import FeatureImitation
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

__all__ = [
    "ADAPTERS",
    "ALIASES",
    "CWD",
    "DEFAULT_METHOD",
    "FGD",
    "METHODS",
    "MGD",
    "PKD",
    "DistillContext",
    "DistillMethod",
    "FeatureImitation",
    "GcBlock",
    "Group",
    "Level",
    "MethodInfo",
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
