"""``evaluate``: COCO box metrics of a detector on a dataset (objects, no config)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..evaluation import evaluate_model
from .training.data_order import make_loader
from .training.evalinfo import EvalInfo, eval_info_for

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 8, num_workers: int = 0,
    device: str | torch.device = "cpu", class_names: Sequence[str] | None = None,
    label_to_cat_id: Mapping[int, int] | None = None, progress: bool = False,
) -> dict[str, Any]:
    """COCO box metrics (AP, AP50, ..., ``per_class`` by name) of ``model`` on ``dataset``.

    ``dataset`` yields ``(image, target)`` pairs (``boxes`` XYXY, ``labels`` 1..K,
    ``image_id``); a structkd ``CocoDetection`` brings its ground truth, category ids and class
    names, any other dataset is read once for its ground truth. ``label_to_cat_id`` maps the
    model's labels to the dataset's category ids when they differ from the dataset's own map
    (a detector saved with its label map). The model's train/eval mode is restored.
    """
    info: EvalInfo = eval_info_for(dataset, class_names)
    l2c = dict(label_to_cat_id) if label_to_cat_id is not None else info.label_to_cat_id
    names = {l2c[label]: name for label, name in enumerate(info.class_names) if label in l2c}
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers,
                         shuffle=False, seed=0)
    model = model.to(torch.device(device))
    return evaluate_model(model, loader, coco_gt=info.coco_gt, label_to_cat_id=l2c,
                          class_names=names, device=device, progress=progress)
