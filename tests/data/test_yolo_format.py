"""COCO -> Ultralytics layout: the label files, read back, match boxes computed here from the COCO
JSON with numpy; crowd and degenerate boxes are skipped; a second run changes nothing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from structkd.data import SyntheticPaths
from structkd.data.yolo_format import to_yolo


def _expected(ann_file: Path, categories: list[dict]) -> dict[str, np.ndarray]:
    """stem -> (n, 5) [cls, cx, cy, w, h] computed independently from the COCO JSON."""
    data = json.loads(ann_file.read_text())
    ids = sorted(c["id"] for c in categories)
    out: dict[str, list[list[float]]] = {}
    images = {im["id"]: im for im in data["images"]}
    for im in data["images"]:
        out[Path(im["file_name"]).stem] = []
    for a in data["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = np.asarray(a["bbox"], dtype=np.float64)
        if a.get("iscrowd", 0) or w <= 0 or h <= 0:
            continue
        x1, y1 = np.clip([x, y], 0, [im["width"], im["height"]])
        x2, y2 = np.clip([x + w, y + h], 0, [im["width"], im["height"]])
        out[Path(im["file_name"]).stem].append([
            ids.index(a["category_id"]), (x1 + x2) / 2 / im["width"],
            (y1 + y2) / 2 / im["height"], (x2 - x1) / im["width"], (y2 - y1) / im["height"]])
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 5) for k, v in out.items()}


def _read_labels(directory: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.loadtxt(p, ndmin=2).reshape(-1, 5) for p in directory.glob("*.txt")}


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])] if len(a) else a


@pytest.fixture
def dataset(coco_data: SyntheticPaths, tmp_path: Path) -> SyntheticPaths:
    """A copy of the synthetic dataset with a crowd box and a degenerate box added to train."""
    root = tmp_path / "coco"
    shutil.copytree(coco_data.root, root)
    paths = SyntheticPaths.under(root)
    data = json.loads(paths.train_ann.read_text())
    first = data["images"][0]["id"]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] += [
        {"id": next_id, "image_id": first, "category_id": data["categories"][-1]["id"],
         "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 1},
        {"id": next_id + 1, "image_id": first, "category_id": data["categories"][0]["id"],
         "bbox": [5, 5, 0, 7], "area": 0, "iscrowd": 0},
    ]
    paths.train_ann.write_text(json.dumps(data))
    return paths


def test_labels_match_the_coco_boxes(dataset: SyntheticPaths, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "yolo"
    with caplog.at_level(logging.INFO, logger="structkd.data"):
        data_yaml = to_yolo(dataset.train_ann, dataset.train_images, dataset.val_ann,
                            dataset.val_images, out)
    assert "skipped crowd=1 degenerate=1" in caplog.text
    spec = yaml.safe_load(data_yaml.read_text())
    categories = json.loads(dataset.train_ann.read_text())["categories"]
    assert Path(spec["path"]) == out.resolve()
    assert spec["train"] == "images/train" and spec["val"] == "images/val"
    assert spec["names"] == {i: c["name"] for i, c in enumerate(
        sorted(categories, key=lambda c: c["id"]))}
    for split, ann in (("train", dataset.train_ann), ("val", dataset.val_ann)):
        expected = _expected(ann, categories)
        got = _read_labels(out / "labels" / split)
        assert sorted(got) == sorted(expected)
        for stem, rows in expected.items():
            np.testing.assert_allclose(_sorted_rows(got[stem]), _sorted_rows(rows), atol=2e-6)
        images = sorted(p.stem for p in (out / "images" / split).iterdir())
        assert images == sorted(expected)
        assert all(p.resolve().is_file() for p in (out / "images" / split).iterdir())
    assert all(np.all(rows[:, 0] == rows[:, 0].astype(int)) for rows in _read_labels(
        out / "labels" / "train").values())


def test_idempotent_and_cleans_up(dataset: SyntheticPaths, tmp_path: Path) -> None:
    out = tmp_path / "yolo"
    args = (dataset.train_ann, dataset.train_images, dataset.val_ann, dataset.val_images, out)
    to_yolo(*args)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    stale = out / "labels" / "train" / "stale.txt"
    stale.write_text("0 0.5 0.5 0.1 0.1\n")
    cache = out / "labels" / "train.cache"
    cache.write_bytes(b"x")
    to_yolo(*args)
    assert not stale.exists() and not cache.exists()  # a label set changed: the cache goes
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == stamps


def test_copies_when_asked(dataset: SyntheticPaths, tmp_path: Path) -> None:
    out = tmp_path / "yolo"
    to_yolo(dataset.train_ann, dataset.train_images, dataset.val_ann, dataset.val_images, out,
            link=False)
    images = list((out / "images" / "val").iterdir())
    assert images and not any(p.is_symlink() for p in images)
