"""Joint image/box transforms (build_transforms), alone and through CocoDetection."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from coco_files import H, W, write_dataset
from PIL import Image
from torchvision import tv_tensors

from structkd.data import CocoDetection, build_transforms


def _known_sample() -> tuple[tv_tensors.Image, dict[str, Any]]:
    """A 20x10 black image with a white block exactly under its single box [2, 3, 6, 8]."""
    image = torch.zeros(3, H, W)
    image[:, 3:8, 2:6] = 1.0
    boxes = tv_tensors.BoundingBoxes([[2.0, 3.0, 6.0, 8.0]], format="XYXY", canvas_size=(H, W))
    return tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([4]), "image_id": 3}


def test_hflip_keeps_boxes_consistent() -> None:
    image, target = _known_sample()
    out_img, out = build_transforms(True, hflip_prob=1.0)(image, target)
    assert out["boxes"].tolist() == [[14.0, 3.0, 18.0, 8.0]]
    assert out["labels"].tolist() == [4] and out["image_id"] == 3
    expected = torch.zeros(3, H, W)
    expected[:, 3:8, 14:18] = 1.0
    assert torch.equal(out_img.as_subclass(torch.Tensor), expected)


def test_hflip_through_dataset(tmp_path: Path) -> None:
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[3:8, 2:6] = 255
    Image.fromarray(img).save(tmp_path / "f.png")
    coco = {
        "images": [{"id": 1, "file_name": "f.png", "width": W, "height": H}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 4, 5]}],
        "categories": [{"id": 1, "name": "block"}],
    }
    ann = write_dataset(tmp_path, coco, images=False)
    image, target = CocoDetection(ann, tmp_path, build_transforms(True, hflip_prob=1.0))[0]
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0].tolist())
    assert (x1, y1, x2, y2) == (14, 3, 18, 8)
    assert bool((image[:, y1:y2, x1:x2] == 1).all()) and float(image.sum()) == 3 * 4 * 5


def test_scale_keeps_boxes_consistent() -> None:
    image, target = _known_sample()
    out_img, out = build_transforms(True, hflip_prob=0.0, scale_range=(2.0, 2.0))(image, target)
    assert out_img.shape == (3, 2 * H, 2 * W)
    assert tuple(out["boxes"].canvas_size) == (2 * H, 2 * W)
    assert out["boxes"].tolist() == [[4.0, 6.0, 12.0, 16.0]]
    # the white block is still under the box
    assert float(out_img[:, 7:15, 5:11].min()) > 0.9
    assert float(out_img[:, :, 13:].max()) < 0.1

    torch.manual_seed(0)
    jitter = build_transforms(True, hflip_prob=0.0, scale_range=(0.5, 1.5))
    sizes = set()
    for _ in range(6):
        img2, t2 = jitter(*_known_sample())
        h, w = img2.shape[-2:]
        sizes.add((h, w))
        assert tuple(t2["boxes"].canvas_size) == (h, w)
        relative = t2["boxes"][0] / torch.tensor([w, h, w, h])
        expected = torch.tensor([2 / W, 3 / H, 6 / W, 8 / H])
        torch.testing.assert_close(relative, expected, atol=1 / h, rtol=0)
    assert len(sizes) > 1  # the factor is random


def test_sanitize_removes_degenerate_boxes_with_labels() -> None:
    image, target = _known_sample()
    target["boxes"] = tv_tensors.BoundingBoxes(
        [[2.0, 3.0, 6.0, 8.0], [5.0, 5.0, 5.0, 9.0], [25.0, 1.0, 30.0, 4.0]],
        format="XYXY",
        canvas_size=(H, W),
    )
    target["labels"] = torch.tensor([4, 5, 6])
    _, out = build_transforms(True, hflip_prob=0.0)(image, target)
    assert out["boxes"].tolist() == [[2.0, 3.0, 6.0, 8.0]]
    assert out["labels"].tolist() == [4]


def test_val_transforms_are_identity() -> None:
    image, target = _known_sample()
    out_img, out = build_transforms(False)(image.clone(), copy.deepcopy(target))
    assert torch.equal(out_img, image) and out_img.dtype == torch.float32
    assert torch.equal(out["boxes"], target["boxes"])
    assert out["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY


def test_val_transforms_convert_uint8_and_box_format() -> None:
    image = tv_tensors.Image(torch.full((3, H, W), 255, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[2.0, 3.0, 4.0, 5.0]], format="XYWH", canvas_size=(H, W))
    out_img, out = build_transforms(False)(image, {"boxes": boxes, "labels": torch.tensor([1])})
    assert out_img.dtype == torch.float32 and float(out_img.max()) == 1.0
    assert out["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert out["boxes"].tolist() == [[2.0, 3.0, 6.0, 8.0]]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"scale_range": (0.0, 1.0)}, "scale_range"),
        ({"scale_range": (2.0, 1.0)}, "scale_range"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
    ],
)
def test_build_transforms_rejects_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_transforms(True, **kwargs)
