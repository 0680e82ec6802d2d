"""Datasets, transforms, the built-in synthetic dataset and sample visualisation."""

from .coco import CocoDetection, collate_fn
from .synthetic import SyntheticPaths, make_synthetic_coco
from .transforms import build_transforms
from .visualize import draw_samples

__all__ = [
    "CocoDetection",
    "SyntheticPaths",
    "build_transforms",
    "collate_fn",
    "draw_samples",
    "make_synthetic_coco",
]
