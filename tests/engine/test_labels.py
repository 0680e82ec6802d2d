"""Per-class AP carries the right names whatever the category ids (gaps, ids from 0): an oracle
detector that finds exactly one class must score 100 AP under that class's name only, through
the training run's validation and through ``structkd eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import structkd
from structkd.data import CocoDetection, build_transforms
from structkd.models import DetectorInfo
from structkd.recipes import evaluate_checkpoint as evaluate
from structkd.recipes import load_config

NAMES = ["disc", "square", "triangle", "ring", "cross", "star"]


def _renumber(src: Path, dst: Path, ids: list[int]) -> Path:
    """A copy of a synthetic split whose six categories have the given ids (names kept)."""
    data = json.loads(src.read_text())
    old_to_new = {c["id"]: new for c, new in zip(data["categories"], ids, strict=True)}
    for c in data["categories"]:
        c["id"] = old_to_new[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = old_to_new[a["category_id"]]
    dst.write_text(json.dumps(data))
    return dst


class Oracle(nn.Module):
    """Predicts the ground-truth boxes of one contiguous label, exactly, with score 1."""

    def __init__(self, dataset: CocoDetection, label: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.label = label
        self.by_image = {}
        for i in range(len(dataset)):
            image, target = dataset[i]
            keep = target["labels"] == label
            self.by_image[self._key(image)] = target["boxes"][keep].as_subclass(torch.Tensor)

    @staticmethod
    def _key(image: torch.Tensor) -> tuple:
        return (tuple(image.shape), round(float(image.sum()), 2))

    def forward(self, images, targets=None):
        if self.training:
            return {"loss": (self.w ** 2).sum() + 0.0 * self.w.sum()}
        out = []
        for image in images:
            boxes = self.by_image[self._key(image)]
            n = len(boxes)
            out.append({"boxes": boxes, "scores": torch.ones(n),
                        "labels": torch.full((n,), self.label, dtype=torch.int64)})
        return out


@pytest.mark.parametrize("ids", [[1, 5, 17, 33, 60, 90], [0, 1, 2, 3, 4, 5],
                                 [90, 60, 33, 17, 5, 1]])
def test_per_class_names_follow_category_ids(coco_data, tmp_path, ids, monkeypatch) -> None:
    train_ann = _renumber(coco_data.train_ann, tmp_path / "train.json", ids)
    val_ann = _renumber(coco_data.val_ann, tmp_path / "val.json", ids)
    train_ds = CocoDetection(train_ann, coco_data.train_images, build_transforms(False))
    val_ds = CocoDetection(val_ann, coco_data.val_images, build_transforms(False),
                           categories=train_ds.coco_gt["categories"])
    # Pick a label whose class occurs in the val split.
    present = sorted({int(lb) for i in range(len(val_ds)) for lb in val_ds[i][1]["labels"]})
    label = present[len(present) // 2]
    name = train_ds.class_names[label]
    oracle = Oracle(val_ds, label)

    result = structkd.fit(oracle, train_ds, val_ds, epochs=1, max_steps=1, progress=False,
                          accelerator="cpu", out_dir=str(tmp_path / "run"), num_workers=0,
                          batch_size=2, threads=1)
    per_class = result.metrics["per_class"]
    assert set(per_class) == set(NAMES)
    assert per_class[name] == pytest.approx(100.0)
    assert all(v <= 0.0 for k, v in per_class.items() if k != name), per_class
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["per_class"]
    assert saved == per_class

    # structkd eval: the label map saved with the model decides the names.
    meta = json.loads((tmp_path / "run" / "student.json").read_text())["meta"]
    info = DetectorInfo(None, meta["class_names"],
                        {int(k): v for k, v in meta["label_to_cat_id"].items()}, "oracle")
    monkeypatch.setattr("structkd.recipes.from_config.load_detector",
                        lambda path: (oracle.eval(), info))
    cfg = load_config(overrides=[f"data.train_ann={train_ann}",
                                 f"data.train_images={coco_data.train_images}",
                                 f"data.val_ann={val_ann}",
                                 f"data.val_images={coco_data.val_images}",
                                 "data.num_workers=0", "trainer.progress=false"])
    metrics = evaluate("oracle", cfg)
    assert metrics["per_class"] == per_class


def test_reference_library_agrees_on_the_oracle(coco_data, tmp_path) -> None:
    """pycocotools, per category id, gives 100 AP to the oracle's class and 0 elsewhere."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = [1, 5, 17, 33, 60, 90]
    val_ann = _renumber(coco_data.val_ann, tmp_path / "val.json", ids)
    val_ds = CocoDetection(val_ann, coco_data.val_images, build_transforms(False))
    label = 2
    oracle = Oracle(val_ds, label).eval()
    dets = []
    for i in range(len(val_ds)):
        image, target = val_ds[i]
        out = oracle([image])[0]
        for box in out["boxes"].tolist():
            dets.append({"image_id": target["image_id"], "category_id": ids[label - 1],
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                         "score": 1.0})
    gt = COCO(str(val_ann))
    dt = gt.loadRes(dets)
    for cat in ids:
        ev = COCOeval(gt, dt, "bbox")
        ev.params.catIds = [cat]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        expected = 1.0 if cat == ids[label - 1] else 0.0
        if ev.stats[0] >= 0:
            assert ev.stats[0] == pytest.approx(expected)
