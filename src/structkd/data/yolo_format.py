"""Convert a COCO-format dataset to Ultralytics' YOLO layout, to train in Ultralytics' own trainer.

Layout written under ``out``::

    images/{train,val}/<file_name>   symlinks to the COCO images (copies where links fail)
    labels/{train,val}/<stem>.txt    one "cls cx cy w h" line per box, normalised to [0, 1]
    data.yaml                        path, train, val, names

Class ids are contiguous 0..K-1 in the order of the COCO categories sorted by id (structkd's
labels 1..K minus one), the val split using the train split's categories. The annotations are
read by :func:`~structkd.data.coco.annotations.read_coco_annotations`, so crowd, degenerate and
fully-outside boxes are skipped (and counted in the log) and boxes are clipped to their image,
exactly as structkd's own training sees them. Running it again gives the same files; files of an
earlier conversion that no longer belong are removed, and Ultralytics' label cache is dropped
whenever a label file changes.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from .coco.annotations import CocoAnnotations, read_coco_annotations

__all__ = ["to_yolo"]

logger = logging.getLogger("structkd.data")


def to_yolo(train_ann: str | os.PathLike, train_images: str | os.PathLike,
            val_ann: str | os.PathLike, val_images: str | os.PathLike,
            out: str | os.PathLike, *, link: bool = True) -> Path:
    """Write the dataset in Ultralytics' layout under ``out``; return the ``data.yaml`` path.

    ``train_images`` / ``val_images`` are the directories the ``file_name`` entries are relative
    to. ``link``: symlink the images (default) or copy them.
    """
    root = Path(out).expanduser().resolve()
    train = read_coco_annotations(train_ann)
    val = read_coco_annotations(val_ann, categories=train.categories)
    for split, ann, images in (("train", train, train_images), ("val", val, val_images)):
        _write_split(root, split, ann, Path(images).expanduser().resolve(), link)
    names = {i: str(c["name"]) for i, c in enumerate(train.categories)}
    data = {"path": str(root), "train": "images/train", "val": "images/val",
            "nc": len(names), "names": names}
    path = root / "data.yaml"
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def label_lines(boxes: Sequence[Sequence[float]], labels: Sequence[int], height: int,
                width: int) -> list[str]:
    """``cls cx cy w h`` lines (normalised) for XYXY pixel ``boxes`` with labels 1..K."""
    lines = []
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        w, h = (x2 - x1) / width, (y2 - y1) / height
        lines.append(f"{int(label) - 1} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def _relative(file_name: str) -> Path:
    """Where an image goes inside ``images/<split>``: its ``file_name``, or its name alone for
    absolute names and names that leave the image directory."""
    rel = Path(os.path.normpath(file_name))
    if rel.is_absolute() or rel.parts[:1] == ("..",):
        return Path(rel.name)
    return rel


def _place_image(source: Path, target: Path, link: bool) -> None:
    """Link (or copy) ``source`` to ``target``, leaving a target that already matches alone."""
    if target.is_symlink():
        if link and Path(os.readlink(target)) == source:
            return
        target.unlink()
    elif target.exists():
        if not link and target.stat().st_size == source.stat().st_size:
            return
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            target.symlink_to(source)
            return
        except OSError:  # no symlinks here (e.g. Windows without the privilege): copy
            pass
    shutil.copy2(source, target)


def _write_split(root: Path, split: str, ann: CocoAnnotations, images: Path, link: bool) -> None:
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    keep_images: set[Path] = set()
    keep_labels: set[Path] = set()
    changed = False
    for file_name, (height, width), boxes, labels in zip(
            ann.files, ann.sizes, ann.boxes, ann.labels, strict=True):
        rel = _relative(file_name)
        source = (images / file_name).resolve()
        if not source.is_file():
            raise FileNotFoundError(f"{source} (file_name {file_name!r} of {split}) does not exist")
        target = image_dir / rel
        label = (label_dir / rel).with_suffix(".txt")
        if label in keep_labels:
            raise ValueError(f"two {split} images map to the label file {label} (same name, "
                             "another extension); rename one")
        _place_image(source, target, link)
        text = "".join(f"{line}\n" for line in label_lines(boxes.tolist(), labels.tolist(),
                                                           height, width))
        if not label.is_file() or label.read_text(encoding="utf-8") != text:
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text, encoding="utf-8")
            changed = True
        keep_images.add(target)
        keep_labels.add(label)
    for directory, keep in ((image_dir, keep_images), (label_dir, keep_labels)):
        for path in sorted(directory.rglob("*")):
            if (path.is_file() or path.is_symlink()) and path not in keep:
                path.unlink()  # left over from an earlier conversion
                changed = True
    cache = label_dir.with_suffix(".cache")  # Ultralytics' label cache, keyed on file sizes
    if changed and cache.exists():
        cache.unlink()
    skipped = ann.skipped
    logger.info("%s: %d images, %d boxes written to %s; skipped crowd=%d degenerate=%d "
                "outside=%d; clipped=%d", split, len(ann.files), ann.num_boxes, label_dir,
                skipped.get("crowd", 0), skipped.get("degenerate", 0), skipped.get("outside", 0),
                ann.num_clipped)
