"""What COCO evaluation needs from a validation dataset: its ground truth and label map."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ...data import CocoDetection
from ...labels import default_class_names

logger = logging.getLogger("structkd.engine")

__all__ = ["EvalInfo", "eval_info_for"]


@dataclass
class EvalInfo:
    """What COCO evaluation needs: the ground truth, label -> category id, names by category."""

    coco_gt: dict[str, Any]
    label_to_cat_id: dict[int, int]
    class_names: list[str] = field(default_factory=list)  # by contiguous label, 0 = background

    def names_by_category(self) -> dict[int, str]:
        return {self.label_to_cat_id[label]: name for label, name in enumerate(self.class_names)
                if label in self.label_to_cat_id}


def _base(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def eval_info_for(ds: Dataset, class_names: Sequence[str] | None = None) -> EvalInfo:
    """The ground truth of ``ds``: a ``CocoDetection`` brings its own; any other dataset of
    torchvision-style targets (``boxes`` XYXY, ``labels`` 1..K, ``image_id``) is read once
    (labels are their own category ids)."""
    base = _base(ds)
    if isinstance(base, CocoDetection):
        names = list(class_names) if class_names is not None else list(base.class_names)
        if len(names) != base.num_classes:
            raise ValueError(f"class_names has {len(names)} entries but {base.ann_file} has "
                             f"{base.num_classes - 1} categories (+ background)")
        return EvalInfo(base.coco_gt, dict(base.label_to_cat_id), names)
    from tqdm.auto import tqdm

    images, annotations, labels_seen = [], [], set()
    for i in tqdm(range(len(ds)), desc="reading validation ground truth", leave=False,  # type: ignore[arg-type]
                  disable=len(ds) < 200):  # type: ignore[arg-type]
        image, target = ds[i]
        image_id = int(target.get("image_id", i))
        h, w = image.shape[-2:]
        images.append({"id": image_id, "width": int(w), "height": int(h), "file_name": str(i)})
        boxes = torch.as_tensor(target["boxes"]).reshape(-1, 4).tolist()
        for box, label in zip(boxes, torch.as_tensor(target["labels"]).tolist(), strict=True):
            x0, y0, x1, y1 = box
            labels_seen.add(int(label))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    k = (len(class_names) - 1) if class_names is not None else max(labels_seen, default=1)
    names = list(class_names) if class_names is not None else default_class_names(k + 1)
    bad = sorted(lb for lb in labels_seen if not 1 <= lb <= k)
    if bad:
        raise ValueError(f"validation labels {bad} are outside 1..{k} (class_names has {k} "
                         "classes besides the background)")
    categories = [{"id": i, "name": names[i]} for i in range(1, k + 1)]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return EvalInfo(gt, {i: i for i in range(1, k + 1)}, names)
