"""Reading and validating COCO annotation files: label mapping, skipped and clipped boxes,
the messages for broken files, and the counts in the log."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from coco_files import CATEGORIES, H, W, base_coco, tiny_dataset, write_dataset

from structkd.data import CocoDetection
from structkd.data.coco import BACKGROUND_NAME, CocoAnnotations, read_coco_annotations


@pytest.fixture
def tiny(tmp_path: Path) -> CocoDetection:
    return tiny_dataset(tmp_path)


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


def test_read_coco_annotations_returns_plain_data(tmp_path: Path) -> None:
    """The reader needs no image files and returns lists, dicts and numpy arrays."""
    coco = base_coco()
    coco["info"] = {"description": "tiny"}
    result = read_coco_annotations(write_dataset(tmp_path, coco, images=False))
    assert isinstance(result, CocoAnnotations)
    assert [c["id"] for c in result.categories] == [3, 7, 11]
    assert result.class_names == [BACKGROUND_NAME, "dog", "cat", "bird"]
    assert result.num_classes == 4 and result.num_boxes == 3
    assert result.cat_id_to_label == {3: 1, 7: 2, 11: 3}
    assert result.label_to_cat_id == {1: 3, 2: 7, 3: 11}
    assert result.image_ids == [1, 2, 5]
    assert result.files == ["im1.png", "im2.png", "im5.png"]
    assert result.sizes == [(H, W)] * 3  # (height, width)
    assert [b.dtype for b in result.boxes] == [np.float32] * 3
    assert [b.shape for b in result.boxes] == [(2, 4), (0, 4), (1, 4)]
    assert result.boxes[2].tolist() == [[15.0, 5.0, 20.0, 10.0]]  # clipped
    assert [lb.dtype for lb in result.labels] == [np.int64] * 3
    assert [lb.tolist() for lb in result.labels] == [[2, 1], [], [3]]
    assert result.skipped == {"crowd": 1, "degenerate": 2, "outside": 1}
    assert result.num_clipped == 1
    assert set(result.coco_gt) == {"images", "annotations", "categories", "info"}
    assert len(result.coco_gt["annotations"]) == 7


def test_read_coco_annotations_with_given_categories(tmp_path: Path) -> None:
    coco = base_coco()
    coco["categories"] = [{"id": 11, "name": "bird"}]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] == 11]
    ann = write_dataset(tmp_path, coco, images=False)
    assert read_coco_annotations(ann).cat_id_to_label == {11: 1}
    result = read_coco_annotations(ann, CATEGORIES)
    assert result.cat_id_to_label == {3: 1, 7: 2, 11: 3}
    assert [lb.tolist() for lb in result.labels] == [[], [], [3]]
    with pytest.raises(ValueError, match=r"categories argument: duplicate category id 7"):
        read_coco_annotations(ann, [*CATEGORIES, {"id": 7, "name": "lynx"}])


@pytest.mark.parametrize(("record", "key", "value", "where"), [
    ("annotations", "id", 10**30, "annotation #0 'id' is 1000000000000000000000000000000"),
    ("images", "id", -(2**53) - 1, "image #0 'id' is -9007199254740993"),
    ("images", "width", 10**400, "image id 1 'width' is 10000000000000000000... (401 digits)"),
    ("categories", "id", 2**62, "category #0 'id' is 4611686018427387904"),
])
def test_numbers_beyond_2_53_are_refused(tmp_path: Path, record: str, key: str, value: int,
                                         where: str) -> None:
    """An id the COCO evaluator cannot hold exactly (it compares ids as float64) would change
    the result silently; a size that large overflowed. Both are an error naming the record."""
    coco = base_coco()
    coco[record][0][key] = value
    path = write_dataset(tmp_path, coco, images=False)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {where}")) as e:
        read_coco_annotations(path)
    assert "expected an integer of magnitude at most 2**53" in str(e.value)


def test_the_largest_ids_are_kept_exactly(tmp_path: Path) -> None:
    coco = base_coco()
    coco["annotations"][0]["id"] = 2**53
    coco["images"][0]["id"] = 2**53 - 1
    coco["annotations"][:3] = [{**a, "image_id": 2**53 - 1} for a in coco["annotations"][:3]]
    ds = CocoDetection(write_dataset(tmp_path, coco), tmp_path)
    assert ds.image_ids[0] == 2**53 - 1 and ds[0][1]["image_id"] == 2**53 - 1
    assert ds.coco_gt["annotations"][0]["id"] == 2**53
