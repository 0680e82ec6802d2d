"""draw_boxes (boxes and labels drawn by torchvision onto the enlarged image), draw_samples, and
the demo's detection grid, which draws with the same helper."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor
from torch import nn

from structkd.data import (
    GT_COLOUR,
    PRED_COLOUR,
    CocoDetection,
    SyntheticPaths,
    draw_boxes,
    draw_samples,
)

GREEN = np.array(ImageColor.getrgb(GT_COLOUR), dtype=np.uint8)
RED = np.array(ImageColor.getrgb(PRED_COLOUR), dtype=np.uint8)


def _is(out: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return (out == colour).all(axis=-1)


def test_draw_boxes_outlines_the_box_on_the_enlarged_image() -> None:
    """A 20x10 image is enlarged 20x (to 400 px >= 384); the box [2, 3, 6, 8] covers pixels
    [40, 120) x [60, 160) there, and its 2 px outline lies on the pixels just inside."""
    out = draw_boxes(torch.zeros(3, 10, 20), [[2, 3, 6, 8]], None, GT_COLOUR)
    assert out.dtype == np.uint8 and out.shape == (200, 400, 3)
    green = _is(out, GREEN)
    ring = np.zeros_like(green)
    ring[60:160, 40:120] = True
    ring[62:158, 42:118] = False
    assert green[ring].all()
    assert not green[~ring].any()
    assert not out[~ring].any()  # everything else stays black


def test_draw_boxes_labels_sit_in_the_top_left_corner() -> None:
    white = torch.ones(3, 10, 20)
    plain = draw_boxes(white, [[2, 3, 6, 8]], None, GT_COLOUR)
    labelled = draw_boxes(white, [[2, 3, 6, 8]], ["cat"], GT_COLOUR)
    ys, xs = np.nonzero((plain != labelled).any(axis=-1))
    assert len(ys) > 50
    assert ys.min() >= 62 and xs.min() >= 42  # inside the outline
    assert ys.max() < 100 and xs.max() < 118  # the corner, not the whole box
    region = labelled[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert _is(region, GREEN).any()  # the label's background (or text) in the box colour
    assert (region.astype(int).sum(axis=-1) < 200).any()  # dark text on it


def test_draw_boxes_colours_per_box_later_on_top() -> None:
    image = torch.zeros(3, 10, 20)
    out = draw_boxes(image, [[2, 3, 6, 8], [2, 3, 6, 8], [10, 1, 19, 9]], None,
                     [GT_COLOUR, PRED_COLOUR, GT_COLOUR])
    assert _is(out[60:160, 40], RED).all() and not _is(out[60:160, 40], GREEN).any()
    assert _is(out[20:180, 200], GREEN).all()  # the third box's left edge


def test_draw_boxes_keeps_large_images_and_clamps_to_the_border() -> None:
    """An image already >= min_size is not enlarged; a box reaching the far border is drawn on
    the last row and column; uint8 images are drawn as they are."""
    image = torch.full((3, 300, 400), 7, dtype=torch.uint8)
    out = draw_boxes(image, torch.tensor([[0.0, 0.0, 400.0, 300.0]]), ["all"], PRED_COLOUR)
    assert out.shape == (300, 400, 3)
    red = _is(out, RED)
    assert red[:, 0].all() and red[:, 399].all() and red[0, :].all() and red[299, :].all()
    assert (out[150, 100:300] == 7).all()
    small = draw_boxes(torch.zeros(3, 10, 20), [[0, 0, 20, 10]], None, GT_COLOUR, min_size=0)
    assert small.shape == (10, 20, 3) and _is(small, GREEN)[:, 19].all()


def test_draw_boxes_without_boxes_is_the_enlarged_image() -> None:
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision warns when given no box
        out = draw_boxes(image, torch.zeros(0, 4), [], GT_COLOUR)
    assert out.shape == (384, 384, 3)
    expected = image.permute(1, 2, 0).numpy()
    assert np.array_equal(out[::6, ::6], expected) and np.array_equal(out[5::6, 5::6], expected)


def test_draw_boxes_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        draw_boxes(torch.zeros(3, 8, 8), [[0, 0, 2, 2], [1, 1, 3, 3]], ["a"], GT_COLOUR)
    with pytest.raises(ValueError, match="1 boxes but 2 colours"):
        draw_boxes(torch.zeros(3, 8, 8), [[0, 0, 2, 2]], None, [GT_COLOUR, PRED_COLOUR])
    with pytest.raises(ValueError, match=r"expected \(3, H, W\)"):
        draw_boxes(torch.zeros(8, 8), [], None, GT_COLOUR)


def test_draw_samples(coco_data: SyntheticPaths, tmp_path: Path) -> None:
    val = json.loads(coco_data.val_ann.read_text())
    preds = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9 if a["id"] % 2 else 0.1,
        }
        for a in val["annotations"]
    ]
    out = draw_samples(
        coco_data.val_ann, coco_data.val_images, tmp_path / "vis" / "val.png", num=4,
        predictions=preds,
    )
    assert out == tmp_path / "vis" / "val.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.size[1] > 200
        pixels = np.asarray(im.convert("RGB"))
    assert _is(pixels, GREEN).sum() > 100 and _is(pixels, RED).sum() > 100
    with pytest.raises(ValueError, match=r"prediction #0 is missing key\(s\) \['score'\]"):
        draw_samples(coco_data.val_ann, coco_data.val_images, tmp_path / "x.png",
                     predictions=[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])


class _Echo(nn.Module):
    """Stands in for a detector: the ground truth of the image, shifted by ``shift`` pixels."""

    def __init__(self, dataset: CocoDetection, shift: float) -> None:
        super().__init__()
        self.dataset, self.shift = dataset, shift

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            index = next(i for i in range(len(self.dataset))
                         if torch.equal(self.dataset[i][0], image))
            target = self.dataset[index][1]
            n = len(target["labels"])
            boxes = (target["boxes"].as_subclass(torch.Tensor) + self.shift).clamp(min=0)
            out.append({"boxes": boxes, "labels": target["labels"],
                        "scores": torch.linspace(0.9, 0.5, n)})
        return out


def test_detection_grid(coco_data: SyntheticPaths, tmp_path: Path) -> None:
    from structkd.apps.pictures import detection_grid

    val = CocoDetection(coco_data.val_ann, coco_data.val_images)
    models = {"teacher": _Echo(val, 1.0), "student": _Echo(val, -1.0)}
    out = detection_grid(models, val, [0, 1], tmp_path / "grid.png")
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[1] > pixels.shape[0] > 600  # 3 panels across, 2 rows
    assert _is(pixels, GREEN).sum() > 100 and _is(pixels, RED).sum() > 100
