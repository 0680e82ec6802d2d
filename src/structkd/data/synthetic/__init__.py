"""Deterministic, cached synthetic COCO-format detection dataset ("shapes on photos").

``render`` draws the images and their annotations (byte-identical for identical parameters);
``cache`` checks the parameters, reuses a matching dataset on disk and replaces a stale one
atomically under a file lock. See ``make_synthetic_coco``.
"""

from .cache import SyntheticPaths, make_synthetic_coco, synthetic_params
from .render import (
    BACKGROUND_SOURCES,
    CLASS_NAMES,
    FORMAT_NAME,
    GENERATOR_VERSION,
    LARGE_AREA,
    MAX_CLUTTER,
    MAX_OCCLUSION,
    SIZE_PROBS,
    SMALL_AREA,
)
from .render import _backgrounds as _backgrounds

__all__ = [
    "BACKGROUND_SOURCES",
    "CLASS_NAMES",
    "FORMAT_NAME",
    "GENERATOR_VERSION",
    "LARGE_AREA",
    "MAX_CLUTTER",
    "MAX_OCCLUSION",
    "SIZE_PROBS",
    "SMALL_AREA",
    "SyntheticPaths",
    "make_synthetic_coco",
    "synthetic_params",
]
