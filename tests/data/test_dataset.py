"""CocoDetection: samples, collate and DataLoader, the up-front image check, file paths."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from coco_files import (
    CATEGORIES,
    H,
    W,
    base_coco,
    single_image_dataset,
    tiny_dataset,
    write_dataset,
)
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from structkd.data import CocoDetection, build_transforms, collate_fn


@pytest.fixture
def tiny(tmp_path: Path) -> CocoDetection:
    return tiny_dataset(tmp_path)


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


def test_image_without_annotations(tiny: CocoDetection) -> None:
    image, target = tiny[1]
    assert image.shape == (3, H, W)
    assert target["boxes"].shape == (0, 4)
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["image_id"] == 2


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


# --------------------------------------------------------------------------- image checks


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
    ds = single_image_dataset(tmp_path, Image.fromarray(noise), "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:-200])
    ds.check_images()
    with pytest.raises(ValueError, match=r"cut\.png \(image id 1\) is corrupt or not an image"):
        ds[0]


def test_check_images_progress_bar_on_large_sets(tmp_path: Path, monkeypatch, capsys,
                                                 caplog) -> None:
    """A bar on large sets while the data logger shows information lines; none when a job
    has quieted that logger (its own bar stays alone)."""
    from structkd.console import quieter
    from structkd.data.coco import dataset as dataset_module

    caplog.set_level(logging.INFO, "structkd.data")  # the CLI's level, whatever ran before
    ds = CocoDetection(write_dataset(tmp_path, _many_images(tmp_path, 4)), tmp_path)
    ds.check_images()
    assert "checking ann.json images" not in capsys.readouterr().err
    monkeypatch.setattr(dataset_module, "CHECK_PROGRESS_MIN", 3)
    ds.check_images()
    assert "checking ann.json images" in capsys.readouterr().err
    with quieter("structkd.data"):
        ds.check_images()
    assert "checking ann.json images" not in capsys.readouterr().err


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


def test_an_unreadable_image_is_named_as_such_after_ultralytics_patched_pil(tmp_path) -> None:
    """Importing ultralytics replaces PIL.Image.open with one that tries to install a HEIF
    plugin for a file PIL cannot identify; structkd's checks still say what is wrong."""
    pytest.importorskip("ultralytics")
    import ultralytics  # noqa: F401  (applies its patch)
    from PIL import Image

    from structkd.data.coco.images import _open_image

    assert Image.open.__module__ == "ultralytics.utils.patches"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        _open_image(bad)
