"""COCO-format detection dataset for torchvision detectors.

The annotation file is validated up front so that a broken dataset fails at construction with a
message naming the file, the record and the offending value, not deep inside a training run.
Category ids are mapped to contiguous labels ``1..K`` (0 is background), the torchvision convention.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

logger = logging.getLogger("structkd.data")

IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")
SKIP_REASONS = ("crowd", "degenerate", "outside")
BACKGROUND_NAME = "__background__"

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

#: Environment variable: the largest image, in pixels, that is opened (0: no limit). Unset, PIL's
#: decompression-bomb guard applies (it refuses images over 2 x ``PIL.Image.MAX_IMAGE_PIXELS``,
#: about 179 million pixels).
MAX_PIXELS_ENV = "STRUCTKD_MAX_IMAGE_PIXELS"
_RAISE_LIMIT_HINT = (
    f"if the file is trusted, raise the limit with the environment variable "
    f"{MAX_PIXELS_ENV}=<pixels> (0 = no limit)"
)

_EXIF_ORIENTATION_TAG = 0x0112
#: EXIF orientation -> (the transpose that shows the image as intended, what it does). The table
#: of ``PIL.ImageOps.exif_transpose``; 5-8 swap width and height.
_EXIF_TRANSPOSE: dict[int, tuple[Image.Transpose, str]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored"),
    3: (Image.Transpose.ROTATE_180, "rotated 180°"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "flipped vertically"),
    5: (Image.Transpose.TRANSPOSE, "transposed"),
    6: (Image.Transpose.ROTATE_270, "rotated 90° clockwise"),
    7: (Image.Transpose.TRANSVERSE, "transversed"),
    8: (Image.Transpose.ROTATE_90, "rotated 90° counter-clockwise"),
}

#: Datasets with more images than this get a progress bar while their headers are checked.
CHECK_PROGRESS_MIN = 1000


class ImageTooLarge(ValueError):
    """An image over the decompression-bomb limit (PIL's, or ``$STRUCTKD_MAX_IMAGE_PIXELS``)."""


def _env_pixel_limit() -> int | None:
    """``$STRUCTKD_MAX_IMAGE_PIXELS`` as a number (0: no limit), None when unset."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"environment variable {MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels "
            "(0 for no limit)"
        )
    return value


def _open_image(path: Path) -> Image.Image:
    """``Image.open`` (reads the header only) under the decompression-bomb limit.

    Raises :class:`ImageTooLarge` for an image over the limit, and whatever ``Image.open`` raises
    for a missing or unreadable file. PIL's ``DecompressionBombWarning`` (images between one and
    two times its limit, which it still opens) is left to the caller to filter.
    """
    limit = _env_pixel_limit()
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = None  # structkd's limit (below) replaces PIL's guard
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"has {pixels[1]} pixels" if pixels else f"is too large ({e})"
        limit_pil = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        raise ImageTooLarge(
            f"{size}, more than PIL's limit of {limit_pil} against decompression bombs"
        ) from None
    if limit:
        w, h = img.size
        if w * h > limit:
            img.close()
            raise ImageTooLarge(
                f"has {w}x{h} = {w * h} pixels, more than the limit {MAX_PIXELS_ENV}={limit}"
            )
    return img


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation of an opened image, 1 when it has none or an invalid one.

    Reads what the header holds (``Image.Image.getexif``: PNG's own ``getexif`` would decode the
    pixels to look for an eXIf chunk after them).
    """
    try:
        value = Image.Image.getexif(img).get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block: PIL's exif_transpose would not rotate either
        return 1
    return value if isinstance(value, int) and value in _EXIF_TRANSPOSE else 1


def _size_problem(
    stored: tuple[int, int], orientation: int, expected: tuple[int, int], apply_exif: bool
) -> str | None:
    """Why an image of ``stored`` (W, H) pixels does not fit the annotated ``expected`` size."""
    rotated = apply_exif and orientation in (5, 6, 7, 8)
    shown = (stored[1], stored[0]) if rotated else stored
    if tuple(shown) == tuple(expected):
        return None
    ew, eh = expected
    if apply_exif and orientation in _EXIF_TRANSPOSE:
        text = (
            f"has size {shown[0]}x{shown[1]} (WxH) once its EXIF orientation {orientation} "
            f"({_EXIF_TRANSPOSE[orientation][1]}) is applied (stored pixels "
            f"{stored[0]}x{stored[1]}), but the annotation file says {ew}x{eh}; structkd applies "
            "EXIF orientation like mmdetection and detectron2, so the annotated width/height and "
            "boxes must describe the image as displayed"
        )
        if tuple(stored) == tuple(expected):
            text += (
                "; the annotation matches the stored pixels, so its boxes were probably drawn on "
                "them: remove the EXIF Orientation tag from the file (or pass apply_exif=False "
                "to CocoDetection)"
            )
        return text
    note = ""
    if orientation in _EXIF_TRANSPOSE:
        note = f" (its EXIF orientation {orientation} is not applied: apply_exif=False)"
    return f"has size {stored[0]}x{stored[1]} (WxH){note} but the annotation file says {ew}x{eh}"


def _describe_open_error(e: BaseException) -> str:
    """What went wrong opening an image file, for a message that names the file before it."""
    if isinstance(e, FileNotFoundError):
        return "does not exist"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(e, PermissionError):
        return "cannot be read (permission denied)"
    if isinstance(e, ImageTooLarge):
        return f"{e}; {_RAISE_LIMIT_HINT}"
    if isinstance(e, UnidentifiedImageError):
        return "is not an image PIL can read (unknown format or corrupt header)"
    return f"is corrupt or not an image ({type(e).__name__}: {e})"


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


def _require_int(value: Any, what: str, source: Path | str) -> int:
    """Return ``value`` as int, accepting only ints (or integral floats), never bools."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: {what} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{source}: {what} must be an integer, got {value!r}")
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


def _image_to_tensor(img: Image.Image) -> Tensor:
    """Convert a PIL image of any common mode to a float32 RGB tensor (3, H, W) in [0, 1].

    16-bit modes are scaled by 65535 (a plain ``convert("RGB")`` would clip them to 255).
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        np.clip(arr, 0.0, 1.0, out=arr)
        chw = torch.from_numpy(np.ascontiguousarray(arr))[None].expand(3, -1, -1).contiguous()
        return chw
    if img.mode == "F":
        raise ValueError(
            "unsupported image mode 'F' (32-bit float) of unknown range; "
            "expected 8-bit (L, P, RGB, RGBA, ...) or 16-bit (I;16, I)"
        )
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning; alpha is dropped below
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, RGBA (alpha dropped), P, CMYK, YCbCr, 1, ...
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(
    path: Path,
    image_id: int,
    expected_size: tuple[int, int] | None = None,
    *,
    apply_exif: bool = True,
) -> Tensor:
    """Load one image as a float32 RGB tensor (3, H, W) in [0, 1].

    With ``apply_exif`` the image's EXIF orientation is applied (as ``PIL.ImageOps.exif_transpose``
    does), so the tensor shows the image as displayed. ``expected_size`` is ``(width, height)``
    from the annotation file, of the image as displayed; a mismatch raises because the boxes
    would then refer to a different image geometry.
    """
    where = f"image file {path} (image id {image_id})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open_image(path)
        with img:
            img.load()
            orientation = _exif_orientation(img)  # after load: PNG may keep EXIF after the pixels
            if expected_size is not None:
                problem = _size_problem(img.size, orientation, expected_size, apply_exif)
                if problem:
                    raise _SizeMismatch(f"{where} {problem}")
            if apply_exif and orientation in _EXIF_TRANSPOSE:
                return _image_to_tensor(img.transpose(_EXIF_TRANSPOSE[orientation][0]))
            return _image_to_tensor(img)
    except _SizeMismatch as e:
        raise ValueError(str(e)) from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where} does not exist") from e
    except (ImageTooLarge, UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{where} {_describe_open_error(e)}") from e
    except ValueError as e:
        raise ValueError(f"cannot decode {where}: {e}") from e


class _SizeMismatch(Exception):
    """Internal: the image does not have the annotated size (the message is final)."""


class CocoDetection(Dataset):
    """Detection dataset over a COCO-format annotation file.

    ``__getitem__`` returns ``(image, target)``: ``image`` is a ``tv_tensors.Image`` float32 RGB
    in [0, 1] of shape (3, H, W); ``target`` holds ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY,
    float32, (N, 4)), ``labels`` (int64, (N,)) and ``image_id`` (int). ``transforms`` is applied
    to ``(image, target)`` jointly.

    Training boxes: crowd, degenerate (w or h <= 0) and fully-outside annotations are skipped and
    counted in ``skipped``; boxes partly outside the image are clipped and counted in
    ``num_clipped``. ``coco_gt`` keeps every annotation (crowd included) for COCO evaluation. A
    split with no usable box at all is logged as a warning with the count per reason.

    Image files are opened only when an item is read; :meth:`check_images` checks them all up
    front (existence, a readable header, the annotated size), reading headers only (about 0.2 ms
    per 640x480 JPEG, 250x faster than decoding it). ``file_name`` may be absolute or contain
    ``../`` (other tools write such files); the log says how many images lie outside
    ``image_dir`` (``num_outside``).

    EXIF orientation: applied by default (``apply_exif=True``), as mmdetection (and detectron2,
    Ultralytics) do: the image is transposed as ``PIL.ImageOps.exif_transpose`` would, so it is
    seen as displayed, and the annotation's ``width``/``height`` and boxes must describe that
    displayed image (for orientations 5-8 that is the stored size with width and height
    swapped). The size check says so when a file's orientation is the cause of a mismatch. Pass
    ``apply_exif=False`` for annotations drawn on the stored pixels of oriented files (or remove
    the files' EXIF Orientation tag).

    Images over the decompression-bomb limit (PIL's, about 179 million pixels) are refused with
    a message naming the file; the environment variable ``STRUCTKD_MAX_IMAGE_PIXELS`` sets the
    limit (0: no limit).

    Args:
        ann_file: COCO JSON with ``images``, ``annotations`` and ``categories``.
        image_dir: directory that ``file_name`` entries are relative to.
        transforms: joint transform ``(image, target) -> (image, target)``.
        categories: category list to define the label mapping, e.g. the train split's
            ``coco_gt["categories"]`` for a val split, so labels are identical across splits.
        apply_exif: apply each image's EXIF orientation (see above).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transforms: Callable | None = None,
        *,
        categories: list[dict] | None = None,
        apply_exif: bool = True,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.apply_exif = apply_exif
        src = self.ann_file

        data = _load_json(src)
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

        # Categories: the label mapping comes from `categories` if given, else from the file.
        file_cats = _validate_categories(data["categories"], src)
        if categories is not None:
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
                    "%s: category ids %s are not in the given categories; "
                    "annotations using them raise",
                    src,
                    extra,
                )
        else:
            cats = file_cats
        self.categories: list[dict] = cats
        self.cat_id_to_label: dict[int, int] = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.label_to_cat_id: dict[int, int] = {v: k for k, v in self.cat_id_to_label.items()}
        self.class_names: list[str] = [BACKGROUND_NAME] + [c["name"] for c in cats]
        self.num_classes: int = len(cats) + 1

        # Images.
        if not data["images"]:
            raise ValueError(f"{src}: 'images' is empty; a split needs at least one image")
        images: list[dict] = []
        index_of: dict[int, int] = {}
        for idx, rec in enumerate(data["images"]):
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

        # Annotations.
        per_image_boxes: list[list[list[float]]] = [[] for _ in images]
        per_image_labels: list[list[int]] = [[] for _ in images]
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        num_clipped = 0
        gt_anns: list[dict] = []
        seen_ann: set[int] = set()
        for idx, ann in enumerate(data["annotations"]):
            _require_keys(ann, ANNOTATION_KEYS, _record_name("annotation", ann, idx), src)
            aid = _require_int(ann["id"], f"annotation #{idx} 'id'", src)
            if aid in seen_ann:
                raise ValueError(f"{src}: duplicate annotation id {aid} (annotation #{idx})")
            seen_ann.add(aid)
            iid = _require_int(ann["image_id"], f"annotation id {aid} 'image_id'", src)
            cid = _require_int(ann["category_id"], f"annotation id {aid} 'category_id'", src)
            if iid not in index_of:
                raise ValueError(f"{src}: annotation id {aid} refers to unknown image_id {iid}")
            if cid not in self.cat_id_to_label:
                raise ValueError(
                    f"{src}: annotation id {aid} refers to unknown category_id {cid}; "
                    f"known category ids {sorted(self.cat_id_to_label)}"
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
                raise ValueError(
                    f"{src}: annotation id {aid} has iscrowd={crowd!r}; expected 0 or 1"
                )
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
            per_image_labels[k].append(self.cat_id_to_label[cid])

        self.image_ids: list[int] = [im["id"] for im in images]
        self._files: list[str] = [im["file_name"] for im in images]
        self._sizes: list[tuple[int, int]] = [(im["height"], im["width"]) for im in images]
        self._boxes: list[np.ndarray] = [
            np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in per_image_boxes
        ]
        self._labels: list[np.ndarray] = [np.asarray(lb, dtype=np.int64) for lb in per_image_labels]
        self.skipped: dict[str, int] = skipped
        self.num_clipped: int = num_clipped
        self.coco_gt: dict = {"images": images, "annotations": gt_anns, "categories": cats}
        if "info" in data:
            self.coco_gt["info"] = data["info"]

        num_used = sum(len(lb) for lb in per_image_labels)
        num_empty = sum(1 for lb in per_image_labels if not lb)
        self.num_boxes: int = num_used
        logger.info(
            "%s: %d images (%d without boxes), %d categories, %d of %d annotations used; "
            "skipped crowd=%d degenerate=%d outside=%d; clipped=%d",
            src,
            len(images),
            num_empty,
            len(cats),
            num_used,
            len(gt_anns),
            skipped["crowd"],
            skipped["degenerate"],
            skipped["outside"],
            num_clipped,
        )
        if num_used == 0:
            reason = (
                f"all {len(gt_anns)} annotations were skipped (crowd={skipped['crowd']}, "
                f"degenerate={skipped['degenerate']}, outside={skipped['outside']})"
                if gt_anns
                else "it has no annotations"
            )
            logger.warning(
                "%s: no usable box in %d images: %s; a detector trained on this split learns "
                "only background, and COCO metrics on it are undefined (-1)",
                src,
                len(images),
                reason,
            )

        # file_name entries that leave image_dir (absolute, or with ../): accepted, and counted.
        root = os.path.normpath(os.path.abspath(self.image_dir))
        outside = [f for f in self._files if not _is_within(root, f)]
        self.num_outside: int = len(outside)
        if outside:
            logger.info(
                "%s: %d of %d images lie outside the image folder %s (absolute paths or ../ in "
                "file_name, e.g. %r); they are read from where file_name points",
                src,
                len(outside),
                len(images),
                self.image_dir,
                outside[0],
            )

    def check_images(self, *, progress: bool | None = None, max_listed: int = 5) -> None:
        """Check every image file up front: it exists, its header is readable, and its size
        (after EXIF orientation, see the class docstring) is the annotated one.

        Reads headers only (no pixels are decoded), from a few threads, with a progress bar for
        more than ``CHECK_PROGRESS_MIN`` images (``progress`` forces it on or off). Pixel data
        that is corrupt after a valid header is still found only when the image is loaded.

        Raises:
            ValueError: naming the annotation file, the number of bad images, and the first
                ``max_listed`` of them with their problem.
        """
        n = len(self)
        start = time.perf_counter()
        _env_pixel_limit()  # a bad value fails here, once, not as a problem of every image
        # A bar on large sets, unless the caller quieted this module's information lines.
        show = (n > CHECK_PROGRESS_MIN and logger.isEnabledFor(logging.INFO)) \
            if progress is None else progress
        problems: list[tuple[int, str]] = []
        num_oriented = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with ThreadPoolExecutor(max_workers=min(8, max(1, n))) as pool:
                results = pool.map(self._check_one, range(n))
                if show:
                    from tqdm.auto import tqdm

                    results = tqdm(
                        results,
                        total=n,
                        desc=f"checking {self.ann_file.name} images",
                        unit="img",
                        leave=False,
                    )
                for index, (problem, orientation) in enumerate(results):
                    if problem is not None:
                        problems.append((index, problem))
                    if orientation in _EXIF_TRANSPOSE:
                        num_oriented += 1
        if problems:
            listed = "; ".join(
                f"image id {self.image_ids[i]} ({self.image_path(i)}) {why}"
                for i, why in problems[:max_listed]
            )
            more = f" (first {max_listed} shown)" if len(problems) > max_listed else ""
            raise ValueError(
                f"{self.ann_file}: {len(problems)} of {n} image files cannot be used{more}: "
                f"{listed}"
            )
        if num_oriented:
            logger.info(
                "%s: %d images carry an EXIF orientation; %s",
                self.ann_file,
                num_oriented,
                "applied (their annotated sizes and boxes describe them as displayed)"
                if self.apply_exif
                else "not applied (apply_exif=False)",
            )
        logger.info(
            "%s: %d image headers checked in %.1f s", self.ann_file, n, time.perf_counter() - start
        )

    def _check_one(self, index: int) -> tuple[str | None, int]:
        """(problem or None, EXIF orientation) of the image file at ``index``, header only."""
        try:
            with _open_image(self.image_path(index)) as img:
                size, orientation = img.size, _exif_orientation(img)
        except Exception as e:  # whatever PIL raises on a bad header is this file's problem
            return _describe_open_error(e), 1
        h, w = self._sizes[index]
        return _size_problem(size, orientation, (w, h), self.apply_exif), orientation

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """Path of the image file at ``index``."""
        return self.image_dir / self._files[index]

    def load_image(self, index: int) -> tv_tensors.Image:
        """Load the image at ``index`` (checked against the annotated size), without transforms."""
        h, w = self._sizes[index]
        img = load_image(
            self.image_path(index), self.image_ids[index], (w, h), apply_exif=self.apply_exif
        )
        return tv_tensors.Image(img)

    def load_target(self, index: int) -> dict[str, Any]:
        """The untransformed target of the image at ``index``."""
        h, w = self._sizes[index]
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor(self._boxes[index]), format="XYXY", canvas_size=(h, w)
        )
        labels = torch.tensor(self._labels[index])
        return {"boxes": boxes, "labels": labels, "image_id": self.image_ids[index]}

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.load_image(index), self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ann_file={str(self.ann_file)!r}, images={len(self)}, "
            f"num_classes={self.num_classes})"
        )


def _is_within(root: str, file_name: str) -> bool:
    """Whether ``root / file_name`` (normalised, symlinks not followed) lies inside ``root``."""
    path = os.path.normpath(os.path.join(root, file_name))
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives
        return False


def collate_fn(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Batch detection samples as lists (images differ in size; the detector batches them)."""
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets
