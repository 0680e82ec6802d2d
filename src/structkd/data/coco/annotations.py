"""Reading and validating a COCO annotation file into plain Python and numpy data.

The file is validated up front so that a broken dataset fails with a message naming the file,
the record and the offending value, not deep inside a training run. Category ids are mapped to
contiguous labels ``1..K`` (0 is background), the torchvision convention.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...labels import BACKGROUND_NAME

logger = logging.getLogger("structkd.data")

IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")
SKIP_REASONS = ("crowd", "degenerate", "outside")


@dataclass
class CocoAnnotations:
    """A validated annotation file (what :func:`read_coco_annotations` returns).

    ``categories`` are sorted by id; label ``i`` (1-based) is ``categories[i - 1]`` and
    ``class_names[0]`` is ``BACKGROUND_NAME``. Per image (in file order): ``image_ids``,
    ``files`` (``file_name`` as written), ``sizes`` as (height, width), and the training
    ``boxes`` (float32 (N, 4) XYXY, clipped to the image) and ``labels`` (int64 (N,)). Crowd,
    degenerate and fully-outside annotations are left out of ``boxes`` and counted in
    ``skipped``; ``num_clipped`` counts boxes clipped to their image. ``coco_gt`` keeps every
    annotation (crowd included) for COCO evaluation.
    """

    categories: list[dict]
    cat_id_to_label: dict[int, int]
    label_to_cat_id: dict[int, int]
    class_names: list[str]
    image_ids: list[int]
    files: list[str]
    sizes: list[tuple[int, int]]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    skipped: dict[str, int]
    num_clipped: int
    coco_gt: dict

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.categories) + 1

    @property
    def num_boxes(self) -> int:
        """Number of training boxes (after skipping)."""
        return sum(len(lb) for lb in self.labels)


def read_coco_annotations(
    ann_file: str | Path, categories: Sequence[dict] | None = None
) -> CocoAnnotations:
    """Read and validate ``ann_file``; log a one-line summary (and a warning without any box).

    ``categories`` (e.g. the train split's ``coco_gt["categories"]`` for a val split) defines the
    label mapping instead of the file's own categories, so labels are identical across splits.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed JSON or an invalid record, naming the file and the record.
    """
    src = Path(ann_file)
    data = _load_json(src)
    _check_top_level(data, src)
    cats = _label_categories(_validate_categories(data["categories"], src), categories, src)
    cat_id_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    images = _validate_images(data["images"], src)
    gt_anns, boxes, labels, skipped, num_clipped = _read_boxes(
        data["annotations"], images, cat_id_to_label, src
    )
    coco_gt: dict = {"images": images, "annotations": gt_anns, "categories": cats}
    if "info" in data:
        coco_gt["info"] = data["info"]
    result = CocoAnnotations(
        categories=cats,
        cat_id_to_label=cat_id_to_label,
        label_to_cat_id={v: k for k, v in cat_id_to_label.items()},
        class_names=[BACKGROUND_NAME] + [c["name"] for c in cats],
        image_ids=[im["id"] for im in images],
        files=[im["file_name"] for im in images],
        sizes=[(im["height"], im["width"]) for im in images],
        boxes=[np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes],
        labels=[np.asarray(lb, dtype=np.int64) for lb in labels],
        skipped=skipped,
        num_clipped=num_clipped,
        coco_gt=coco_gt,
    )
    _log_summary(result, src)
    return result


def _load_json(path: Path) -> Any:
    """Read a JSON file, turning decode errors into a ValueError that names file and position."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist (or is not a file)")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 encoded JSON: {e}") from e


def _check_top_level(data: Any, src: Path) -> None:
    """Raise unless ``data`` is an object with lists 'images', 'annotations' and 'categories'."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{src}: top level must be a JSON object with keys 'images', 'annotations', "
            f"'categories', got {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(
                f"{src}: missing top-level key '{key}'; expected 'images', 'annotations' "
                f"and 'categories'"
            )
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise ValueError(
                f"{src}: top-level key '{key}' must be a list, got {type(data[key]).__name__}"
            )


def _require_keys(record: Any, keys: Sequence[str], where: str, source: Path | str) -> None:
    """Raise if ``record`` is not a dict holding every key in ``keys``."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: {where} must be a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(
            f"{source}: {where} is missing required key(s) {missing}; expected keys {list(keys)}"
        )


def _record_name(kind: str, record: Any, index: int) -> str:
    """Human-readable name of a record for error messages: its id if it has one, else its index."""
    key = "categories" if kind == "category" else f"{kind}s"
    if isinstance(record, dict) and "id" in record:
        return f"{kind} id {record['id']!r} (#{index} in '{key}')"
    return f"{kind} #{index} in '{key}'"


# The largest integer magnitude kept exactly: the COCO evaluator handles ids as float64, which
# holds every integer up to 2**53 (ids near 2**62 collapsed there and broke the evaluation).
MAX_ID = 2**53


def _require_int(value: Any, what: str, source: Path | str) -> int:
    """Return ``value`` as int, accepting only ints (or integral floats) of magnitude at most
    2**53, never bools: a larger id would be silently changed on its way to the evaluator."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: {what} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{source}: {what} must be an integer, got {value!r}")
    if not -MAX_ID <= value <= MAX_ID:
        shown = f"{value!r}" if len(repr(value)) <= 40 else f"{repr(value)[:20]}... " \
            f"({len(str(abs(int(value))))} digits)"
        raise ValueError(f"{source}: {what} is {shown}; expected an integer of magnitude at most "
                         "2**53 (the largest float64, which the COCO evaluator uses, holds "
                         "exactly)")
    return int(value)


def _validate_categories(categories: Any, source: Path | str) -> list[dict]:
    """Check a category list (ids unique ints, names strings) and return it sorted by id."""
    if not isinstance(categories, list):
        raise ValueError(f"{source}: 'categories' must be a list, got {type(categories).__name__}")
    if not categories:
        raise ValueError(f"{source}: 'categories' is empty; expected at least one category")
    seen: dict[int, int] = {}
    out = []
    for idx, cat in enumerate(categories):
        _require_keys(cat, CATEGORY_KEYS, _record_name("category", cat, idx), source)
        cid = _require_int(cat["id"], f"category #{idx} 'id'", source)
        if cid in seen:
            raise ValueError(
                f"{source}: duplicate category id {cid} (categories #{seen[cid]} and #{idx})"
            )
        if not isinstance(cat["name"], str):
            raise ValueError(
                f"{source}: category id {cid} 'name' must be a string, got {cat['name']!r}"
            )
        seen[cid] = idx
        out.append({**cat, "id": cid})
    return sorted(out, key=lambda c: c["id"])


def _label_categories(
    file_cats: list[dict], categories: Sequence[dict] | None, src: Path
) -> list[dict]:
    """The categories that define the labels: ``categories`` if given (checked against the
    file's: same names for shared ids), else the file's own."""
    if categories is None:
        return file_cats
    cats = _validate_categories(list(categories), "categories argument")
    known = {c["id"]: c["name"] for c in cats}
    for c in file_cats:
        if c["id"] in known and known[c["id"]] != c["name"]:
            raise ValueError(
                f"{src}: category id {c['id']} is named {c['name']!r} but the given "
                f"categories name it {known[c['id']]!r}"
            )
    extra = sorted(c["id"] for c in file_cats if c["id"] not in known)
    if extra:
        logger.warning(
            "%s: category ids %s are not in the given categories; annotations using them raise",
            src,
            extra,
        )
    return cats


def _validate_images(records: list, src: Path) -> list[dict]:
    """Check the image records (unique int ids, positive sizes, a file name); normalised copies."""
    if not records:
        raise ValueError(f"{src}: 'images' is empty; a split needs at least one image")
    images: list[dict] = []
    index_of: dict[int, int] = {}
    for idx, rec in enumerate(records):
        _require_keys(rec, IMAGE_KEYS, _record_name("image", rec, idx), src)
        iid = _require_int(rec["id"], f"image #{idx} 'id'", src)
        if iid in index_of:
            raise ValueError(
                f"{src}: duplicate image id {iid} (images #{index_of[iid]} and #{idx})"
            )
        w = _require_int(rec["width"], f"image id {iid} 'width'", src)
        h = _require_int(rec["height"], f"image id {iid} 'height'", src)
        if w <= 0 or h <= 0:
            raise ValueError(
                f"{src}: image id {iid} has width={w}, height={h}; expected positive sizes"
            )
        if not isinstance(rec["file_name"], str) or not rec["file_name"]:
            raise ValueError(
                f"{src}: image id {iid} 'file_name' must be a non-empty string, "
                f"got {rec['file_name']!r}"
            )
        index_of[iid] = idx
        images.append({**rec, "id": iid, "width": w, "height": h})
    return images


def _read_boxes(
    annotations: list, images: list[dict], cat_id_to_label: dict[int, int], src: Path
) -> tuple[list[dict], list[list[list[float]]], list[list[int]], dict[str, int], int]:
    """Validate the annotations: (ground truth for evaluation, training boxes and labels per
    image, skip counts per reason, number of clipped boxes)."""
    index_of = {im["id"]: k for k, im in enumerate(images)}
    per_image_boxes: list[list[list[float]]] = [[] for _ in images]
    per_image_labels: list[list[int]] = [[] for _ in images]
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    num_clipped = 0
    gt_anns: list[dict] = []
    seen_ann: set[int] = set()
    for idx, ann in enumerate(annotations):
        _require_keys(ann, ANNOTATION_KEYS, _record_name("annotation", ann, idx), src)
        aid = _require_int(ann["id"], f"annotation #{idx} 'id'", src)
        if aid in seen_ann:
            raise ValueError(f"{src}: duplicate annotation id {aid} (annotation #{idx})")
        seen_ann.add(aid)
        iid = _require_int(ann["image_id"], f"annotation id {aid} 'image_id'", src)
        cid = _require_int(ann["category_id"], f"annotation id {aid} 'category_id'", src)
        if iid not in index_of:
            raise ValueError(f"{src}: annotation id {aid} refers to unknown image_id {iid}")
        if cid not in cat_id_to_label:
            raise ValueError(
                f"{src}: annotation id {aid} refers to unknown category_id {cid}; "
                f"known category ids {sorted(cat_id_to_label)}"
            )
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            or not all(math.isfinite(v) for v in bbox)
        ):
            raise ValueError(
                f"{src}: annotation id {aid} has bbox {bbox!r}; expected [x, y, width, height] "
                f"of 4 finite numbers"
            )
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise ValueError(f"{src}: annotation id {aid} has iscrowd={crowd!r}; expected 0 or 1")
        x, y, bw, bh = (float(v) for v in bbox)
        area = ann.get("area", max(bw, 0.0) * max(bh, 0.0))
        if isinstance(area, bool) or not isinstance(area, (int, float)) or area < 0:
            raise ValueError(
                f"{src}: annotation id {aid} has area {area!r}; expected a number >= 0"
            )
        gt_anns.append(
            {
                **ann,
                "id": aid,
                "image_id": iid,
                "category_id": cid,
                "iscrowd": int(crowd),
                "area": float(area),
            }
        )
        k = index_of[iid]
        width, height = images[k]["width"], images[k]["height"]
        if crowd:
            skipped["crowd"] += 1
            continue
        if bw <= 0 or bh <= 0:
            skipped["degenerate"] += 1
            continue
        x1, y1, x2, y2 = x, y, x + bw, y + bh
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            skipped["outside"] += 1
            continue
        cx1, cy1 = max(x1, 0.0), max(y1, 0.0)
        cx2, cy2 = min(x2, float(width)), min(y2, float(height))
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            num_clipped += 1
        per_image_boxes[k].append([cx1, cy1, cx2, cy2])
        per_image_labels[k].append(cat_id_to_label[cid])
    return gt_anns, per_image_boxes, per_image_labels, skipped, num_clipped


def _log_summary(ann: CocoAnnotations, src: Path) -> None:
    """One information line with the counts; a warning when no box is left for training."""
    skipped = ann.skipped
    num_used = ann.num_boxes
    num_images = len(ann.image_ids)
    num_anns = len(ann.coco_gt["annotations"])
    logger.info(
        "%s: %d images (%d without boxes), %d categories, %d of %d annotations used; "
        "skipped crowd=%d degenerate=%d outside=%d; clipped=%d",
        src,
        num_images,
        sum(1 for lb in ann.labels if not len(lb)),
        len(ann.categories),
        num_used,
        num_anns,
        skipped["crowd"],
        skipped["degenerate"],
        skipped["outside"],
        ann.num_clipped,
    )
    if num_used == 0:
        reason = (
            f"all {num_anns} annotations were skipped (crowd={skipped['crowd']}, "
            f"degenerate={skipped['degenerate']}, outside={skipped['outside']})"
            if num_anns
            else "it has no annotations"
        )
        logger.warning(
            "%s: no usable box in %d images: %s; a detector trained on this split learns "
            "only background, and COCO metrics on it are undefined (-1)",
            src,
            num_images,
            reason,
        )
