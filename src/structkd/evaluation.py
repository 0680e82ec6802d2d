"""COCO box metrics (faster-coco-eval) for torchvision detectors.

faster-coco-eval reproduces pycocotools' numbers (checked in the tests) at a fraction of the time.
All AP/AR values are returned in percent; ``-1.0`` marks a metric that is undefined because the
ground truth has no (non-crowd) object in that area range, as in pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .detectors import as_detector

__all__ = [
    "METRIC_KEYS",
    "TABLE_KEYS",
    "coco_metrics",
    "evaluate_model",
    "format_metrics_table",
    "predictions_to_coco",
]

METRIC_KEYS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
TABLE_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet(*_: Any, **__: Any) -> None:
    """faster-coco-eval print hook that discards everything."""


def _check_gt(coco_gt: Mapping[str, Any]) -> None:
    if not isinstance(coco_gt, Mapping):
        raise ValueError(f"coco_gt of type {type(coco_gt).__name__} is invalid; expected a dict")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco_gt.get(key), list):
            raise ValueError(
                f"coco_gt[{key!r}]={coco_gt.get(key)!r:.80} is invalid; expected a list "
                "(COCO instances format)"
            )
    if not coco_gt["categories"]:
        raise ValueError("coco_gt['categories'] is empty; expected at least one category")


def _copy_gt(coco_gt: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow per-annotation copy: faster-coco-eval writes keys (``ignore``) into the dicts."""
    annotations = []
    for ann in coco_gt["annotations"]:
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:  # pycocotools requires it; box area is the natural fallback
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        annotations.append(ann)
    return {
        **coco_gt,
        "images": [dict(img) for img in coco_gt["images"]],
        "annotations": annotations,
        "categories": [dict(cat) for cat in coco_gt["categories"]],
    }


def _check_detections(
    detections: Sequence[Mapping[str, Any]], image_ids: set[int], cat_ids: set[int]
) -> list[dict[str, Any]]:
    out = []
    for i, det in enumerate(detections):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
        if missing:
            raise ValueError(f"detections[{i}] lacks keys {missing}; expected COCO results format")
        if det["image_id"] not in image_ids:
            raise ValueError(
                f"detections[{i}]['image_id']={det['image_id']!r} is not an image of coco_gt"
            )
        if det["category_id"] not in cat_ids:
            raise ValueError(
                f"detections[{i}]['category_id']={det['category_id']!r} is not a category of "
                f"coco_gt; expected one of {sorted(cat_ids)}"
            )
        if len(det["bbox"]) != 4:
            raise ValueError(
                f"detections[{i}]['bbox']={det['bbox']!r} is invalid; expected [x,y,w,h]"
            )
        out.append({**det, "bbox": [float(v) for v in det["bbox"]], "score": float(det["score"])})
    return out


def coco_metrics(
    coco_gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    class_names: Mapping[int, str] | None = None,
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """COCO bbox metrics of ``detections`` against the ground truth dict ``coco_gt``.

    ``image_ids`` restricts the evaluation to those images (e.g. when only the first N of a
    split were run); otherwise every image of ``coco_gt`` counts, with or without detections.

    ``detections`` use the COCO results format (``image_id``, ``category_id``, ``bbox`` as
    ``[x, y, w, h]``, ``score``). Returns ``{key: value for key in METRIC_KEYS}`` in percent plus
    ``"per_class": {name: AP}`` (AP@[.5:.95], ``-1.0`` for a class without ground truth).
    ``class_names`` maps category id -> name (default: the names in ``coco_gt['categories']``).
    Neither input is modified.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    _check_gt(coco_gt)
    gt = _copy_gt(coco_gt)
    if image_ids is not None:
        keep = {int(i) for i in image_ids}
        unknown = sorted(keep - {int(img["id"]) for img in gt["images"]})
        if unknown:
            raise ValueError(f"image_ids {unknown[:5]} are not in coco_gt['images']")
        gt["images"] = [img for img in gt["images"] if int(img["id"]) in keep]
        gt["annotations"] = [a for a in gt["annotations"] if int(a["image_id"]) in keep]
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
    names.update({int(k): str(v) for k, v in (class_names or {}).items()})
    dets = _check_detections(detections, {img["id"] for img in gt["images"]}, set(cat_ids))

    empty = {key: 0.0 for key in METRIC_KEYS}
    if not gt["images"]:
        return {**empty, "per_class": {names[c]: 0.0 for c in cat_ids}}
    # Both classes print through print_function (and COCO through logging); silence any leftovers.
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(gt, print_function=_quiet)
        coco_dt = coco.loadRes(dets)
        evaluator = COCOeval_faster(coco, coco_dt, iouType="bbox", print_function=_quiet)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)[: len(METRIC_KEYS)]
    result: dict[str, Any] = {
        key: (float(v) * 100.0 if v >= 0 else -1.0)
        for key, v in zip(METRIC_KEYS, stats, strict=True)
    }
    # precision: [iou thresholds, recall thresholds, categories, area ranges, max dets]
    precision = np.asarray(evaluator.eval["precision"])
    eval_cats = [int(c) for c in evaluator.params.catIds]
    per_class: dict[str, float] = {}
    for k, cat in enumerate(eval_cats):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[names[cat]] = float(values.mean()) * 100.0 if values.size else -1.0
    result["per_class"] = per_class
    return result


def predictions_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
) -> list[dict[str, Any]]:
    """Torchvision detector outputs -> COCO results.

    ``outputs[i]`` has ``boxes`` (XYXY, original image coordinates), ``labels`` and ``scores`` for
    image ``image_ids[i]``; labels are mapped to COCO category ids with ``label_to_cat_id``.
    Label 0 is the background and is dropped unless mapped (torchvision's RetinaNet and FCOS
    score it like any other class; it is only ever trained as negative). Any other unmapped
    label raises ``ValueError``.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(
            f"outputs has {len(outputs)} entries but image_ids has {len(image_ids)}; expected equal"
        )
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].detach().to("cpu", torch.float64)
        labels = output["labels"].detach().to("cpu").tolist()
        scores = output["scores"].detach().to("cpu", torch.float64).tolist()
        if boxes.numel():
            boxes[:, 2:] -= boxes[:, :2]
        for box, label, score in zip(boxes.tolist(), labels, scores, strict=True):
            if label == 0 and 0 not in label_to_cat_id:
                continue  # background: RetinaNet/FCOS score every logit, including index 0
            if label not in label_to_cat_id:
                raise ValueError(
                    f"label {label} of image {image_id} has no entry in label_to_cat_id; expected "
                    f"one of {sorted(label_to_cat_id)}"
                )
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat_id[label]),
                    "bbox": box,
                    "score": score,
                }
            )
    return results


def _image_id(target: Mapping[str, Any]) -> int:
    if "image_id" not in target:
        raise ValueError(
            f"target keys {sorted(target)} lack 'image_id'; expected it in every target"
        )
    value = target["image_id"]
    return int(value.item() if isinstance(value, torch.Tensor) else value)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable[tuple[Sequence[torch.Tensor], Sequence[Mapping[str, Any]]]],
    *,
    coco_gt: Mapping[str, Any],
    label_to_cat_id: Mapping[int, int],
    class_names: Mapping[int, str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``model`` in eval mode over ``loader`` and compute :func:`coco_metrics`.

    ``loader`` yields ``(images, targets)`` as lists (a detection ``collate_fn``); only each
    target's ``image_id`` is used. The model must return boxes in the images' own coordinates (as
    torchvision detectors do); a model of another family is wrapped by its adapter. Its
    train/eval mode is restored afterwards.
    """
    model = as_detector(model)
    was_training = model.training
    model.eval()
    detections: list[dict[str, Any]] = []
    seen: set[int] = set()
    n_images = 0
    try:
        iterator: Iterable[Any] = loader
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(loader, desc="evaluate", leave=False)
        for images, targets in iterator:
            outputs = model([img.to(device, non_blocking=True) for img in images])
            ids = [_image_id(t) for t in targets]
            detections += predictions_to_coco(outputs, ids, label_to_cat_id)
            seen.update(ids)
            n_images += len(images)
    finally:
        model.train(was_training)
    # Only the images the loader yielded count (a loader over part of a split is fine).
    metrics = coco_metrics(coco_gt, detections, class_names=class_names, image_ids=seen)
    metrics["num_images"] = n_images
    metrics["num_detections"] = len(detections)
    return metrics


def format_metrics_table(
    rows: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = TABLE_KEYS
) -> str:
    """Markdown table, one row per model name, one column per metric (``-`` where undefined)."""
    header = "| model | " + " | ".join(keys) + " |"
    lines = [header, "|---|" + "---:|" * len(keys)]
    for name, metrics in rows.items():
        cells = []
        for key in keys:
            value = metrics.get(key)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
            cells.append(f"{value:.1f}" if ok else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
