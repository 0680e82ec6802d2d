"""COCO-format detection dataset for torchvision detectors.

``images`` reads one image file (decompression-bomb limit, EXIF orientation, size check),
``annotations`` reads and validates an annotation file, ``dataset`` holds ``CocoDetection``.
The names below are re-exported for ``structkd.data.coco.<name>``; patch a module constant
(e.g. ``CHECK_PROGRESS_MIN``) in the submodule that uses it, not here.
"""

from ..collate import collate_fn
from .annotations import (
    ANNOTATION_KEYS,
    BACKGROUND_NAME,
    CATEGORY_KEYS,
    IMAGE_KEYS,
    SKIP_REASONS,
    CocoAnnotations,
    read_coco_annotations,
)
from .dataset import CHECK_PROGRESS_MIN, CocoDetection
from .images import MAX_PIXELS_ENV, ImageTooLarge, load_image

__all__ = [
    "ANNOTATION_KEYS",
    "BACKGROUND_NAME",
    "CATEGORY_KEYS",
    "CHECK_PROGRESS_MIN",
    "IMAGE_KEYS",
    "MAX_PIXELS_ENV",
    "SKIP_REASONS",
    "CocoAnnotations",
    "CocoDetection",
    "ImageTooLarge",
    "collate_fn",
    "load_image",
    "read_coco_annotations",
]
