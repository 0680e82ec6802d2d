"""Label maps: contiguous labels 1..K (0 is the background) <-> dataset category ids and names.

The one definition of the background's name, of placeholder class names, and of the
``label -> (category id, name)`` map that datasets, saved detectors and ONNX exports compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["BACKGROUND_NAME", "default_class_names", "label_map"]

BACKGROUND_NAME = "__background__"


def default_class_names(num_classes: int) -> list[str]:
    """``["__background__", "class_1", ..., "class_{K}"]`` for ``num_classes = K + 1``."""
    return [BACKGROUND_NAME] + [f"class_{i}" for i in range(1, num_classes)]


def label_map(class_names: Sequence[str],
              label_to_cat_id: Mapping[int, int] | None = None) -> dict[int, tuple[int, str]]:
    """contiguous label -> (category id, name), background excluded; labels are their own
    category ids where ``label_to_cat_id`` does not say otherwise."""
    ids = label_to_cat_id or {}
    return {i: (int(ids.get(i, i)), name) for i, name in enumerate(class_names) if i > 0}
