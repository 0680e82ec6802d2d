"""The distances by name, and the one builder that checks their options.

``DISTANCES`` maps a name to an ``nn.Module`` class taking (student, teacher) maps; each class
declares its options in a frozen dataclass (``options_type``), against which ``build_distance``
checks option names and from which ``distance_options`` reads the defaults.
"""

from __future__ import annotations

import typing
from typing import Any

from torch import nn

from ..checks import check_types
from .l1 import L1Loss
from .mse import MSELoss
from .options import DistanceOptions
from .ssim import SSIMLoss

DISTANCES: dict[str, type[nn.Module]] = {
    "ssim": SSIMLoss,
    "l1": L1Loss,
    "mse": MSELoss,
    "l2": MSELoss,
}


def _options_type(name: str) -> type[DistanceOptions]:
    if name not in DISTANCES:
        raise ValueError(f"distance={name!r} is unknown; expected one of {sorted(DISTANCES)}")
    return DISTANCES[name].options_type  # type: ignore[attr-defined]


def build_distance(name: str, **options: Any) -> nn.Module:
    """Build a registered distance by name; unknown option names raise a ``ValueError`` naming
    them, the distance and the valid names, values of another type name their annotation
    (ranges are checked by the options dataclass)."""
    options_type = _options_type(name)
    options_type.check_names(options, what=f"distance {name!r}")
    check_types(options, typing.get_type_hints(options_type), f"distance {name!r}")
    return DISTANCES[name](**options)


def distance_options(name: str) -> dict[str, Any]:
    """Each option of a registered distance with its default, in declaration order."""
    return _options_type(name).defaults()
