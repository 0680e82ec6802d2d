"""COCO metrics: faster-coco-eval vs pycocotools, edge cases, conversion and an end-to-end run."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch

from structkd.evaluation import (
    METRIC_KEYS,
    coco_metrics,
    evaluate_model,
    format_metrics_table,
    predictions_to_coco,
)
from structkd.models import build_detector


def _box(rng: np.random.Generator, size: float, w: int, h: int) -> list[float]:
    bw = size * rng.uniform(0.7, 1.4)
    bh = size * size / bw
    x = rng.uniform(0, w - bw)
    y = rng.uniform(0, h - bh)
    return [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]


def make_gt() -> dict:
    """5 images (one without objects), 3 categories, small/medium/large boxes, crowd regions."""
    rng = np.random.default_rng(0)
    images = [
        {"id": i, "width": 320, "height": 240, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4, 7)
    ]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "bird"}]
    anns = []
    sizes = (12.0, 20.0, 50.0, 80.0, 120.0, 150.0)  # areas below 32², between, above 96²
    for img in images[:4]:
        for k in range(6):
            bbox = _box(rng, sizes[(k + img["id"]) % len(sizes)], 320, 240)
            anns.append(
                {
                    "image_id": img["id"],
                    "category_id": [1, 2, 5][k % 3],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    anns.append(
        {
            "image_id": 2,
            "category_id": 1,
            "bbox": [150.0, 100.0, 120.0, 100.0],
            "area": 12000.0,
            "iscrowd": 1,
        }
    )
    anns.append(
        {
            "image_id": 3,
            "category_id": 2,
            "bbox": [0.0, 0.0, 60.0, 60.0],
            "area": 3600.0,
            "iscrowd": 1,
        }
    )
    for i, ann in enumerate(anns, start=1):
        ann["id"] = i
    return {"images": images, "annotations": anns, "categories": categories}


def make_detections(gt: dict, seed: int = 1) -> list[dict]:
    """Jittered copies of GT boxes (some with wrong class) plus random false positives."""
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        for _ in range(2):
            x, y, w, h = ann["bbox"]
            jit = rng.normal(0, 0.08, 4) * [w, h, w, h]
            cat = ann["category_id"] if rng.uniform() < 0.85 else int(rng.choice([1, 2, 5]))
            dets.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": cat,
                    "bbox": [x + jit[0], y + jit[1], max(w + jit[2], 1.0), max(h + jit[3], 1.0)],
                    "score": float(rng.uniform()),
                }
            )
    for img in gt["images"]:
        for _ in range(4):
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": int(rng.choice([1, 2, 5])),
                    "bbox": _box(rng, float(rng.uniform(8, 150)), 320, 240),
                    "score": float(rng.uniform(0, 0.6)),
                }
            )
    return dets


def pycocotools_stats(gt: dict, dets: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        coco_dt = coco.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


@pytest.mark.parametrize("seed", [1, 2])
def test_matches_pycocotools(seed: int) -> None:
    gt = make_gt()
    dets = make_detections(gt, seed)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    ours = coco_metrics(gt, dets)
    reference = pycocotools_stats(gt, dets) * 100.0
    assert gt == gt_before and dets == dets_before  # inputs untouched
    for key, ref in zip(METRIC_KEYS, reference, strict=True):
        assert ref >= 0, key  # the fixture covers every area range
        assert ours[key] == pytest.approx(ref, abs=1e-6 * 100), key
    assert 0 < ours["AP"] < 100
    assert set(ours["per_class"]) == {"cat", "dog", "bird"}
    assert np.mean(list(ours["per_class"].values())) == pytest.approx(ours["AP"], abs=1e-6)


def test_perfect_and_empty_detections() -> None:
    gt = make_gt()
    perfect = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    metrics = coco_metrics(gt, perfect, class_names={5: "sparrow"})
    for key in METRIC_KEYS:
        if key != "AR1":  # two objects of a class per image: one detection recalls half
            assert metrics[key] == pytest.approx(100.0), key
    assert metrics["AR1"] == pytest.approx(50.0)
    assert metrics["per_class"] == pytest.approx({"cat": 100.0, "dog": 100.0, "sparrow": 100.0})

    empty = coco_metrics(gt, [])
    assert all(empty[key] == 0.0 for key in METRIC_KEYS)
    assert all(v == 0.0 for v in empty["per_class"].values())


def test_image_ids_restrict_the_evaluation() -> None:
    """Evaluating part of a split (data.limit_val) must not count the other images' objects as
    missed: with image_ids, perfect detections on that part give AP 100."""
    gt = make_gt()
    first = gt["images"][0]["id"]
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "score": 1.0}
        for a in gt["annotations"] if not a["iscrowd"] and a["image_id"] == first
    ]
    assert perfect
    assert coco_metrics(gt, perfect)["AR100"] < 100.0  # other images' objects are missed
    part = coco_metrics(gt, perfect, image_ids=[first])
    assert part["AP50"] == pytest.approx(100.0) and part["AR100"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match=r"image_ids \[123456\] are not in coco_gt"):
        coco_metrics(gt, perfect, image_ids=[first, 123456])


def test_undefined_area_range_is_minus_one() -> None:
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "iscrowd": 0}
        ],
    }  # no "area": filled from the box
    metrics = coco_metrics(
        gt, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9}]
    )
    assert metrics["AP"] == pytest.approx(100.0) and metrics["APm"] == pytest.approx(100.0)
    assert metrics["APs"] == -1.0 and metrics["APl"] == -1.0
    assert "-" in format_metrics_table({"m": metrics})


def test_bad_detections_raise() -> None:
    gt = make_gt()
    with pytest.raises(ValueError, match="category_id"):
        coco_metrics(gt, [{"image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(ValueError, match="image_id"):
        coco_metrics(gt, [{"image_id": 42, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(ValueError, match="categories"):
        coco_metrics({"images": [], "annotations": []}, [])


def test_predictions_to_coco() -> None:
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
            "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.25]),
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "scores": torch.zeros(0),
        },
    ]
    results = predictions_to_coco(outputs, [11, 12], {1: 5, 2: 7})
    assert len(results) == 2
    assert results[0] == {
        "image_id": 11,
        "category_id": 5,
        "bbox": [10.0, 20.0, 30.0, 40.0],
        "score": pytest.approx(0.9),
    }
    assert results[1]["category_id"] == 7 and results[1]["bbox"] == [0.0, 0.0, 5.0, 5.0]
    background = [{"boxes": torch.ones(1, 4), "labels": torch.tensor([0]), "scores": torch.ones(1)}]
    assert predictions_to_coco(background, [11], {1: 5}) == []  # label 0 = background, dropped
    with pytest.raises(ValueError, match="label 2"):
        predictions_to_coco(outputs[:1], [11], {1: 5})
    with pytest.raises(ValueError, match="image_ids"):
        predictions_to_coco(outputs, [11], {1: 5, 2: 7})


def test_format_metrics_table() -> None:
    table = format_metrics_table(
        {"student": {k: 12.345 for k in METRIC_KEYS}, "kd": {k: 20.0 for k in METRIC_KEYS}}
    )
    lines = table.splitlines()
    assert lines[0] == "| model | AP | AP50 | AP75 | APs | APm | APl |"
    assert lines[2].startswith("| student | 12.3 |") and lines[3].startswith("| kd | 20.0 |")


def test_evaluate_model_end_to_end() -> None:
    torch.manual_seed(0)
    model = build_detector(
        arch="fcos",
        num_classes=3,
        backbone="resnet18",
        fpn_channels=32,
        min_size=64,
        max_size=64,
        score_thresh=0.0,
        detections_per_img=20,
    )
    gt = {
        "images": [{"id": i, "width": 80, "height": 64} for i in (3, 4, 5)],
        "categories": [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 3,
                "category_id": 10,
                "bbox": [5, 5, 30, 30],
                "area": 900.0,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 4,
                "category_id": 20,
                "bbox": [40, 10, 30, 40],
                "area": 1200.0,
                "iscrowd": 0,
            },
        ],
    }
    loader = [
        ([torch.rand(3, 64, 80), torch.rand(3, 64, 80)], [{"image_id": 3}, {"image_id": 4}]),
        ([torch.rand(3, 64, 80)], [{"image_id": torch.tensor(5)}]),
    ]
    model.train()
    metrics = evaluate_model(model, loader, coco_gt=gt, label_to_cat_id={1: 10, 2: 20})
    assert model.training  # mode restored
    assert metrics["num_images"] == 3 and metrics["num_detections"] > 0
    assert set(METRIC_KEYS) <= set(metrics) and set(metrics["per_class"]) == {"a", "b"}
    assert all(0.0 <= metrics[k] <= 100.0 or metrics[k] == -1.0 for k in METRIC_KEYS)


def test_the_largest_accepted_ids_give_the_same_ap_as_small_ids() -> None:
    """Ids up to 2**53 (the largest an annotation file may hold, see tests/data: the evaluator
    compares ids as float64) evaluate exactly like the same objects and detections with ids
    1, 2, 3, ... (pycocotools on the small ids is the reference)."""
    gt, dets = make_gt(), make_detections(make_gt(), 1)
    big = {i["id"]: 2**53 - k for k, i in enumerate(gt["images"])}
    gt_big = copy.deepcopy(gt)
    for im in gt_big["images"]:
        im["id"] = big[im["id"]]
    for k, ann in enumerate(gt_big["annotations"]):
        ann["image_id"], ann["id"] = big[ann["image_id"]], 2**53 - k
    dets_big = [{**d, "image_id": big[d["image_id"]]} for d in dets]
    reference = pycocotools_stats(gt, dets) * 100.0
    ours = coco_metrics(gt_big, dets_big)
    for key, ref in zip(METRIC_KEYS, reference, strict=True):
        assert ours[key] == pytest.approx(ref, abs=1e-4), key
