"""Tests of the COCO dataset, collate function and transforms on tiny datasets in tmp_path."""

from __future__ import annotations

import copy
import json
import logging
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from structkd.data import CocoDetection, build_transforms, collate_fn

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


@pytest.fixture
def tiny(tmp_path: Path) -> CocoDetection:
    return CocoDetection(write_dataset(tmp_path, base_coco()), tmp_path)


def test_category_mapping_and_back(tiny: CocoDetection) -> None:
    assert tiny.num_classes == 4
    assert tiny.class_names == ["__background__", "dog", "cat", "bird"]  # sorted by category id
    assert tiny.cat_id_to_label == {3: 1, 7: 2, 11: 3}
    assert tiny.label_to_cat_id == {1: 3, 2: 7, 3: 11}
    for cid, label in tiny.cat_id_to_label.items():
        assert tiny.label_to_cat_id[label] == cid
    assert tiny.image_ids == [1, 2, 5]
    _, target = tiny[0]
    assert target["labels"].tolist() == [2, 1]  # cat (7), dog (3); crowd bird dropped
    assert [tiny.label_to_cat_id[lb] for lb in target["labels"].tolist()] == [7, 3]


def test_sample_types(tiny: CocoDetection) -> None:
    image, target = tiny[0]
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(boxes.canvas_size) == (H, W)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[2, 3, 6, 8], [0, 0, 20, 10]]
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and isinstance(target["image_id"], int)


def test_val_split_reuses_train_categories(tmp_path: Path, tiny: CocoDetection) -> None:
    val = {
        "images": [{"id": 9, "file_name": "v.png", "width": W, "height": H}],
        "annotations": [{"id": 1, "image_id": 9, "category_id": 11, "bbox": [1, 1, 5, 5]}],
        "categories": [{"id": 11, "name": "bird"}],
    }
    ann = write_dataset(tmp_path / "val", val, name="val.json")
    alone = CocoDetection(ann, tmp_path / "val")
    assert alone.cat_id_to_label == {11: 1}  # a different mapping on its own...
    ds = CocoDetection(ann, tmp_path / "val", categories=tiny.coco_gt["categories"])
    assert ds.cat_id_to_label == tiny.cat_id_to_label  # ...the train one when given
    assert ds.class_names == tiny.class_names and ds.num_classes == 4
    assert ds[0][1]["labels"].tolist() == [3]

    val["annotations"][0]["category_id"] = 99
    val["categories"].append({"id": 99, "name": "fish"})
    ann = write_dataset(tmp_path / "val2", val, name="val2.json")
    with pytest.raises(ValueError, match=r"val2\.json.*annotation id 1 .*unknown category_id 99"):
        CocoDetection(ann, tmp_path / "val2", categories=tiny.coco_gt["categories"])

    val["annotations"][0]["category_id"] = 11
    val["categories"] = [{"id": 11, "name": "eagle"}]
    ann = write_dataset(tmp_path / "val3", val, name="val3.json")
    with pytest.raises(ValueError, match=r"val3\.json.*category id 11 .*'eagle'.*'bird'"):
        CocoDetection(ann, tmp_path / "val3", categories=tiny.coco_gt["categories"])


def test_crowd_ignored_for_training_but_kept_for_eval(tiny: CocoDetection) -> None:
    assert tiny.skipped["crowd"] == 1
    crowd = [a for a in tiny.coco_gt["annotations"] if a["iscrowd"] == 1]
    assert [a["id"] for a in crowd] == [3]
    assert len(tiny.coco_gt["annotations"]) == 7  # everything stays in the ground truth
    assert all("area" in a and "iscrowd" in a for a in tiny.coco_gt["annotations"])
    assert [im["id"] for im in tiny.coco_gt["images"]] == [1, 2, 5]


def test_image_without_annotations(tiny: CocoDetection) -> None:
    image, target = tiny[1]
    assert image.shape == (3, H, W)
    assert target["boxes"].shape == (0, 4)
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["image_id"] == 2


def test_clip_and_skip_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="structkd.data"):
        ds = CocoDetection(write_dataset(tmp_path, base_coco()), tmp_path)
    assert ds.skipped == {"crowd": 1, "degenerate": 2, "outside": 1}
    assert ds.num_clipped == 1
    _, target = ds[2]
    assert target["boxes"].tolist() == [[15, 5, 20, 10]]
    assert target["labels"].tolist() == [3]
    summary = [r.getMessage() for r in caplog.records if r.name == "structkd.data"]
    assert len(summary) == 1
    assert "crowd=1 degenerate=2 outside=1; clipped=1" in summary[0]
    assert "ann.json" in summary[0]


def _drop(d: dict, key: str) -> dict:
    del d[key]
    return d


# (name of the case, mutation of the valid dict, pattern the message must match)
BAD_CASES = [
    ("no_images_key", lambda c: _drop(c, "images"), r"missing top-level key 'images'"),
    ("no_annotations_key", lambda c: _drop(c, "annotations"), r"top-level key 'annotations'"),
    ("no_categories_key", lambda c: _drop(c, "categories"), r"top-level key 'categories'"),
    (
        "image_no_width",
        lambda c: _drop(c["images"][1], "width") and c,
        r"image id 2 .*missing required key\(s\) \['width'\]",
    ),
    (
        "image_no_file_name",
        lambda c: _drop(c["images"][0], "file_name") and c,
        r"image id 1 .*\['file_name'\]",
    ),
    ("image_no_id", lambda c: _drop(c["images"][2], "id") and c, r"image #2 .*\['id'\]"),
    (
        "ann_no_bbox",
        lambda c: _drop(c["annotations"][3], "bbox") and c,
        r"annotation id 4 .*\['bbox'\]",
    ),
    (
        "ann_no_image_id",
        lambda c: _drop(c["annotations"][0], "image_id") and c,
        r"annotation id 1 .*\['image_id'\]",
    ),
    (
        "ann_no_category_id",
        lambda c: _drop(c["annotations"][1], "category_id") and c,
        r"annotation id 2 .*\['category_id'\]",
    ),
    (
        "ann_unknown_image",
        lambda c: c["annotations"][1].update(image_id=42) or c,
        r"annotation id 2 refers to unknown image_id 42",
    ),
    (
        "ann_unknown_category",
        lambda c: c["annotations"][0].update(category_id=5) or c,
        r"annotation id 1 refers to unknown category_id 5",
    ),
    ("duplicate_image_id", lambda c: c["images"][2].update(id=1) or c, r"duplicate image id 1"),
    (
        "duplicate_ann_id",
        lambda c: c["annotations"][2].update(id=1) or c,
        r"duplicate annotation id 1",
    ),
    (
        "duplicate_category_id",
        lambda c: c["categories"][1].update(id=7) or c,
        r"duplicate category id 7",
    ),
    ("empty_split", lambda c: {**c, "images": [], "annotations": []}, r"'images' is empty"),
    (
        "bad_bbox",
        lambda c: c["annotations"][0].update(bbox=[1, 2, 3]) or c,
        r"annotation id 1 has bbox \[1, 2, 3\]",
    ),
    (
        "nan_bbox",
        lambda c: c["annotations"][0].update(bbox=[1, 2, float("nan"), 3]) or c,
        r"annotation id 1 has bbox",
    ),
    ("bad_width", lambda c: c["images"][0].update(width=0) or c, r"image id 1 has width=0"),
    (
        "bad_iscrowd",
        lambda c: c["annotations"][0].update(iscrowd=2) or c,
        r"annotation id 1 has iscrowd=2",
    ),
    ("not_an_object", lambda c: [c], r"top level must be a JSON object"),
]


@pytest.mark.parametrize(("case", "mutate", "pattern"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_annotation_file(tmp_path: Path, case: str, mutate: Any, pattern: str) -> None:
    coco = mutate(base_coco())
    ann = write_dataset(tmp_path, coco, name=f"{case}.json", images=False)
    with pytest.raises(ValueError, match=re.escape(str(ann)) + r".*" + pattern):
        CocoDetection(ann, tmp_path)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_malformed_json(tmp_path: Path) -> None:
    ann = tmp_path / "broken.json"
    ann.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON at line 2 column"):
        CocoDetection(ann, tmp_path)


def test_missing_image_file(tmp_path: Path) -> None:
    ds = CocoDetection(write_dataset(tmp_path, base_coco()), tmp_path)
    (tmp_path / "im2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"im2\.png \(image id 2\) does not exist"):
        ds[1]


def test_corrupt_image_file(tmp_path: Path) -> None:
    ds = CocoDetection(write_dataset(tmp_path, base_coco()), tmp_path)
    (tmp_path / "im5.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match=r"im5\.png \(image id 5\)"):
        ds[2]


def test_image_size_mismatch(tmp_path: Path) -> None:
    ds = CocoDetection(write_dataset(tmp_path, base_coco()), tmp_path)
    Image.new("RGB", (30, 10)).save(tmp_path / "im1.png")
    with pytest.raises(ValueError, match=r"im1\.png \(image id 1\) has size 30x10.*says 20x10"):
        ds[0]


def _single_image_dataset(tmp_path: Path, img: Image.Image, file_name: str) -> CocoDetection:
    img.save(tmp_path / file_name)
    coco = {
        "images": [{"id": 1, "file_name": file_name, "width": img.width, "height": img.height}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return CocoDetection(write_dataset(tmp_path, coco, images=False), tmp_path)


def _expect_rgb(image: torch.Tensor, rgb: np.ndarray) -> None:
    assert image.dtype == torch.float32 and image.shape == (3, 4, 6)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    expected = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)
    torch.testing.assert_close(image.as_subclass(torch.Tensor), expected, atol=1e-6, rtol=0)


def test_grayscale_image(tmp_path: Path) -> None:
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    ds = _single_image_dataset(tmp_path, Image.fromarray(gray, mode="L"), "g.png")
    _expect_rgb(ds[0][0], np.repeat(gray[:, :, None], 3, axis=2) / 255.0)


def test_rgba_image_drops_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[..., 3] = 0  # fully transparent: the colour must survive, not turn black
    ds = _single_image_dataset(tmp_path, Image.fromarray(rgba, mode="RGBA"), "a.png")
    _expect_rgb(ds[0][0], rgba[..., :3] / 255.0)


def test_palette_image(tmp_path: Path) -> None:
    idx = (np.arange(24).reshape(4, 6) % 3).astype(np.uint8)
    img = Image.fromarray(idx, mode="P")
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]
    img.putpalette(palette + [0] * (768 - len(palette)))
    ds = _single_image_dataset(tmp_path, img, "p.png")
    lut = np.array(palette, dtype=np.float64).reshape(3, 3) / 255.0
    _expect_rgb(ds[0][0], lut[idx])


def test_sixteen_bit_image(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 24).astype(np.uint16).reshape(4, 6)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    ds = _single_image_dataset(tmp_path, img, "s16.png")
    loaded = ds[0][0]
    _expect_rgb(loaded, np.repeat(values[:, :, None], 3, axis=2) / 65535.0)
    assert float(loaded.max()) == 1.0 and float(loaded[0, 2, 0]) < 1.0  # not clipped at 255


def test_int32_mode_image(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 24).astype(np.int32).reshape(4, 6)
    img = Image.fromarray(values, mode="I")
    ds = _single_image_dataset(tmp_path, img, "i32.tif")
    _expect_rgb(ds[0][0], np.repeat(values[:, :, None], 3, axis=2) / 65535.0)


def test_collate_fn(tiny: CocoDetection) -> None:
    images, targets = collate_fn([tiny[0], tiny[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for t in targets] == [1, 2]


def test_dataloader_two_workers(tmp_path: Path) -> None:
    ds = CocoDetection(write_dataset(tmp_path, base_coco()), tmp_path, build_transforms(True))
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_fn)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [2, 1]
    ids = [t["image_id"] for _, targets in batches for t in targets]
    assert ids == [1, 2, 5]
    assert all(
        isinstance(b, tv_tensors.BoundingBoxes)
        for _, ts in batches
        for b in (t["boxes"] for t in ts)
    )


# --------------------------------------------------------------------------- transforms


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


# --------------------------------------------------------------------------- image checks


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


def _many_images(root: Path, n: int) -> dict[str, Any]:
    images = [{"id": i, "file_name": f"m{i}.png", "width": W, "height": H} for i in range(n)]
    return {"images": images, "annotations": [], "categories": copy.deepcopy(CATEGORIES)}


def test_check_images_passes_a_good_dataset(tiny: CocoDetection, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="structkd.data"):
        tiny.check_images()
    assert any("3 image headers checked" in r.getMessage() for r in caplog.records)


def test_check_images_lists_count_and_first_offenders(tmp_path: Path) -> None:
    """Every kind of bad file is found at once; the message gives the count, the first five
    with their problem, and the annotation file."""
    coco = _many_images(tmp_path, 9)
    ds = CocoDetection(write_dataset(tmp_path, coco), tmp_path)
    (tmp_path / "m0.png").unlink()  # missing
    (tmp_path / "m2.png").write_bytes(b"not an image at all")  # garbage
    Image.new("RGB", (30, 10)).save(tmp_path / "m3.png")  # wrong size
    (tmp_path / "m5.png").unlink()
    (tmp_path / "m5.png").mkdir()  # a directory
    (tmp_path / "m6.png").write_bytes(b"")  # empty
    (tmp_path / "m8.png").unlink()
    with pytest.raises(ValueError) as info:
        ds.check_images()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'ann.json'}: 6 of 9 image files cannot be used")
    assert "(first 5 shown)" in msg
    assert f"image id 0 ({tmp_path / 'm0.png'}) does not exist" in msg
    assert f"image id 2 ({tmp_path / 'm2.png'}) is not an image PIL can read" in msg
    assert "image id 3 " in msg and "has size 30x10 (WxH) but the annotation file says 20x10" in msg
    assert "image id 5 " in msg and "is a directory" in msg
    assert "image id 6 " in msg
    assert "image id 8 " not in msg  # the sixth offender is counted, not listed


def test_check_images_reads_headers_only(tmp_path: Path) -> None:
    """Pixel data cut short after a valid header passes the check (nothing is decoded) and is
    reported, naming the file, when the image is loaded."""
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    ds = _single_image_dataset(tmp_path, Image.fromarray(noise), "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:-200])
    ds.check_images()
    with pytest.raises(ValueError, match=r"cut\.png \(image id 1\) is corrupt or not an image"):
        ds[0]


def test_check_images_progress_bar_on_large_sets(tmp_path: Path, monkeypatch, capsys,
                                                 caplog) -> None:
    """A bar on large sets while the data logger shows information lines; none when a job
    has quieted that logger (its own bar stays alone)."""
    from structkd.console import quieter
    from structkd.data import coco as coco_module

    caplog.set_level(logging.INFO, "structkd.data")  # the CLI's level, whatever ran before
    ds = CocoDetection(write_dataset(tmp_path, _many_images(tmp_path, 4)), tmp_path)
    ds.check_images()
    assert "checking ann.json images" not in capsys.readouterr().err
    monkeypatch.setattr(coco_module, "CHECK_PROGRESS_MIN", 3)
    ds.check_images()
    assert "checking ann.json images" in capsys.readouterr().err
    with quieter("structkd.data"):
        ds.check_images()
    assert "checking ann.json images" not in capsys.readouterr().err


def test_load_datasets_checks_both_splits(tmp_path: Path) -> None:
    from structkd.config import DataConfig
    from structkd.engine.data import DataPaths, load_datasets

    train_ann = write_dataset(tmp_path / "train", base_coco(), name="train.json")
    val_ann = write_dataset(tmp_path / "val", base_coco(), name="val.json")
    (tmp_path / "train" / "im2.png").unlink()
    (tmp_path / "val" / "im5.png").unlink()
    paths = DataPaths(train_ann, tmp_path / "train", val_ann, tmp_path / "val")
    with pytest.raises(ValueError) as info:
        load_datasets(DataConfig(), paths)
    msg = str(info.value)
    assert f"{train_ann}: 1 of 3 image files cannot be used: image id 2" in msg
    assert f"{val_ann}: 1 of 3 image files cannot be used: image id 5" in msg
    with pytest.raises(ValueError) as info:  # evaluation needs only val's images
        load_datasets(DataConfig(), paths, check=("val",))
    assert str(val_ann) in str(info.value) and str(train_ann) not in str(info.value)


# --------------------------------------------------------------------------- decompression bombs


@pytest.fixture
def pil_limit(monkeypatch):
    """Restore PIL's MAX_IMAGE_PIXELS (STRUCTKD_MAX_IMAGE_PIXELS lifts it process-wide)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.delenv("STRUCTKD_MAX_IMAGE_PIXELS", raising=False)
    return monkeypatch


def _bomb_dataset(tmp_path: Path) -> CocoDetection:
    (tmp_path / "huge.png").write_bytes(_png_header_only(20000, 20000))
    coco = {
        "images": [{"id": 4, "file_name": "huge.png", "width": 20000, "height": 20000}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return CocoDetection(write_dataset(tmp_path, coco, images=False), tmp_path)


def test_decompression_bomb_names_file_and_limit(tmp_path: Path, pil_limit) -> None:
    ds = _bomb_dataset(tmp_path)
    expected = (
        r" has 400000000 pixels, more than PIL's limit of 178956970 against "
        r"decompression bombs; if the file is trusted, raise the limit with the environment "
        r"variable STRUCTKD_MAX_IMAGE_PIXELS=<pixels> \(0 = no limit\)"
    )
    with pytest.raises(ValueError, match=r"image id 4 \(.*huge\.png\)" + expected):
        ds.check_images()
    with pytest.raises(ValueError, match=r"huge\.png \(image id 4\)" + expected):
        ds.load_image(0)


def test_max_image_pixels_env(tmp_path: Path, pil_limit) -> None:
    ds = _bomb_dataset(tmp_path)
    pil_limit.setenv("STRUCTKD_MAX_IMAGE_PIXELS", "0")
    ds.check_images()  # no limit: the 20000x20000 header passes
    tiny = CocoDetection(write_dataset(tmp_path / "t", base_coco()), tmp_path / "t")
    pil_limit.setenv("STRUCTKD_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(
        ValueError,
        match=r"has 20x10 = 200 pixels, more than the limit "
        r"STRUCTKD_MAX_IMAGE_PIXELS=100",
    ):
        tiny[0]
    pil_limit.setenv("STRUCTKD_MAX_IMAGE_PIXELS", "many")
    with pytest.raises(ValueError, match=r"STRUCTKD_MAX_IMAGE_PIXELS='many': expected a whole"):
        tiny.check_images()


# --------------------------------------------------------------------------- EXIF orientation


def _oriented_png(path: Path, orientation: int) -> Image.Image:
    """A 6x4 (WxH) PNG with distinct pixels and an EXIF orientation; returns the stored image."""
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)
    return img


def _oriented_dataset(tmp_path: Path, orientation: int, size: tuple[int, int], **kw):
    _oriented_png(tmp_path / "o.png", orientation)
    coco = {
        "images": [{"id": 1, "file_name": "o.png", "width": size[0], "height": size[1]}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 5]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return CocoDetection(write_dataset(tmp_path, coco, images=False), tmp_path, **kw)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, caplog) -> None:
    """Pixels as ``ImageOps.exif_transpose`` shows them; annotated size = the displayed size."""
    from PIL import ImageOps

    displayed = (4, 6) if orientation in (6, 8) else (6, 4)
    ds = _oriented_dataset(tmp_path, orientation, displayed)
    with caplog.at_level(logging.INFO, logger="structkd.data"):
        ds.check_images()
    assert any(
        "1 images carry an EXIF orientation; applied" in r.getMessage() for r in caplog.records
    )
    image, target = ds[0]
    with Image.open(tmp_path / "o.png") as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    assert image.shape == (3, displayed[1], displayed[0])
    assert tuple(target["boxes"].canvas_size) == (displayed[1], displayed[0])
    torch.testing.assert_close(
        image.as_subclass(torch.Tensor),
        torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255,
    )


def test_exif_size_mismatch_says_orientation_and_what_to_do(tmp_path: Path) -> None:
    """Annotated with the stored size of a file whose EXIF says rotate 90°: both the start-up
    check and the loader say that orientation is applied and what the annotation matches."""
    ds = _oriented_dataset(tmp_path, 6, (6, 4))
    pattern = (
        r"has size 4x6 \(WxH\) once its EXIF orientation 6 \(rotated 90° clockwise\) is applied "
        r"\(stored pixels 6x4\), but the annotation file says 6x4; structkd applies EXIF "
        r"orientation.*matches the stored pixels.*remove the EXIF Orientation tag"
    )
    with pytest.raises(ValueError, match=r"o\.png\) " + pattern):
        ds.check_images()
    with pytest.raises(ValueError, match=r"o\.png \(image id 1\) " + pattern):
        ds[0]


def test_exif_orientation_can_be_ignored(tmp_path: Path) -> None:
    ds = _oriented_dataset(tmp_path, 6, (6, 4), apply_exif=False)
    ds.check_images()
    image, _ = ds[0]
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    torch.testing.assert_close(
        image.as_subclass(torch.Tensor), torch.from_numpy(stored).permute(2, 0, 1).float() / 255
    )


# --------------------------------------------------------------------------- counts in the log


def test_no_usable_box_warns_with_counts_per_reason(tmp_path: Path, caplog) -> None:
    coco = base_coco()
    coco["annotations"] = [a for a in coco["annotations"] if a["id"] in (3, 5, 6, 7)]
    with caplog.at_level(logging.WARNING, logger="structkd.data"):
        ds = CocoDetection(write_dataset(tmp_path, coco), tmp_path)
    assert ds.num_boxes == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ann.json: no usable box in 3 images: all 4 annotations were skipped" in warnings[0]
    assert "(crowd=1, degenerate=2, outside=1)" in warnings[0]


def test_no_annotations_at_all_warns(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="structkd.data"):
        CocoDetection(write_dataset(tmp_path, {**base_coco(), "annotations": []}), tmp_path)
    assert any(
        "no usable box in 3 images: it has no annotations" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


def test_usable_boxes_do_not_warn(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="structkd.data"):
        ds = CocoDetection(write_dataset(tmp_path, base_coco()), tmp_path)
    assert ds.num_boxes == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_absolute_and_parent_paths_are_read_and_counted(tmp_path: Path, caplog) -> None:
    coco = base_coco()
    root = tmp_path / "images"
    write_dataset(tmp_path / "elsewhere", coco, name="unused.json")
    coco["images"][0]["file_name"] = str(tmp_path / "elsewhere" / "im1.png")  # absolute
    coco["images"][1]["file_name"] = "../elsewhere/im2.png"
    coco["images"][2]["file_name"] = "sub/../im5.png"  # stays inside
    (root / "sub").mkdir(parents=True)  # the OS resolves sub/.. only if sub exists
    Image.new("RGB", (W, H)).save(root / "im5.png")
    with caplog.at_level(logging.INFO, logger="structkd.data"):
        ds = CocoDetection(write_dataset(tmp_path, coco, images=False), root)
    assert ds.num_outside == 2
    assert any(
        f"2 of 3 images lie outside the image folder {root}" in r.getMessage()
        for r in caplog.records
    )
    ds.check_images()
    assert [ds[i][1]["image_id"] for i in range(3)] == [1, 2, 5]
