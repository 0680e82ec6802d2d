"""Tiny COCO annotation files and images in tmp_path, shared by the tests of structkd.data.coco.

Imported by name (``from coco_files import ...``): pytest puts this folder on ``sys.path``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from PIL import Image

from structkd.data import CocoDetection

W, H = 20, 10  # image size of the tiny dataset

CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 11, "name": "bird"}]


def base_coco() -> dict[str, Any]:
    """Three 20x10 images: one with boxes and a crowd box, one empty, one with invalid boxes."""
    images = [{"id": i, "file_name": f"im{i}.png", "width": W, "height": H} for i in (1, 2, 5)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 4, 5]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 10], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 11, "bbox": [1, 1, 2, 2], "iscrowd": 1},
        {"id": 4, "image_id": 5, "category_id": 11, "bbox": [15, 5, 10, 10]},  # clipped
        {"id": 5, "image_id": 5, "category_id": 7, "bbox": [1, 1, 0, 3]},  # degenerate
        {"id": 6, "image_id": 5, "category_id": 7, "bbox": [30, 0, 5, 5]},  # outside
        {"id": 7, "image_id": 5, "category_id": 3, "bbox": [1, 1, 3, -2]},  # degenerate
    ]
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}


def write_dataset(root: Path, coco: Any, name: str = "ann.json", images: bool = True) -> Path:
    """Write ``coco`` as JSON and (optionally) a black RGB PNG per image record."""
    root.mkdir(parents=True, exist_ok=True)
    if images:
        for im in coco["images"]:
            Image.new("RGB", (im["width"], im["height"])).save(root / im["file_name"])
    path = root / name
    path.write_text(json.dumps(coco))
    return path


def tiny_dataset(root: Path) -> CocoDetection:
    """``base_coco()`` with its black images, written to ``root``."""
    return CocoDetection(write_dataset(root, base_coco()), root)


def single_image_dataset(root: Path, img: Image.Image, file_name: str) -> CocoDetection:
    """A dataset of one image file ``file_name`` (``img`` saved as is), without annotations."""
    img.save(root / file_name)
    coco = {
        "images": [{"id": 1, "file_name": file_name, "width": img.width, "height": img.height}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return CocoDetection(write_dataset(root, coco, images=False), root)
