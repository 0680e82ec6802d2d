"""Datasets, transforms, the built-in synthetic dataset and sample visualisation."""

from .coco import CocoDetection
from .collate import collate_fn
from .synthetic import SyntheticPaths, make_synthetic_coco
from .transforms import build_transforms
from .visualize import GT_COLOUR, PRED_COLOUR, draw_boxes, draw_samples

__all__ = [
    "GT_COLOUR",
    "PRED_COLOUR",
    "CocoDetection",
    "SyntheticPaths",
    "build_transforms",
    "collate_fn",
    "draw_boxes",
    "draw_samples",
    "make_synthetic_coco",
]
