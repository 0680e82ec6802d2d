"""The synthetic dataset on disk: parameter checks, reuse of a matching dataset, atomic replace.

``make_synthetic_coco`` validates its parameters, reuses a complete dataset generated with the
same ones (``meta.json``), and otherwise renders a new one (``render._generate``) into a
temporary sibling directory that is renamed into place, under a file lock (``filelock``) so
that concurrent callers (several DDP ranks, parallel test workers) generate it once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .render import (
    FORMAT_NAME,
    GENERATOR_VERSION,
    MAX_CLUTTER,
    MAX_OCCLUSION,
    SIZE_PROBS,
    _generate,
)

logger = logging.getLogger("structkd.data")


@dataclass(frozen=True)
class SyntheticPaths:
    """Locations of a generated dataset (``*_images`` are the ``image_dir`` of each split)."""

    root: Path
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path

    @classmethod
    def under(cls, root: Path) -> SyntheticPaths:
        return cls(root, root / "train.json", root / "train", root / "val.json", root / "val")


def _lock_path(root: Path) -> Path:
    """The lock file that serialises ``make_synthetic_coco`` calls on ``root`` (a sibling)."""
    return root.parent / f".{root.name}.lock"


def make_synthetic_coco(
    root: str | Path,
    *,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 256,
    seed: int = 0,
    max_objects: int = 8,
    max_occlusion: float = MAX_OCCLUSION,
    clutter: int = MAX_CLUTTER,
    size_probs: tuple[float, float, float] | list[float] = SIZE_PROBS,
    overwrite: bool = False,
) -> SyntheticPaths:
    """Generate (or reuse) the synthetic dataset under ``root`` and return its paths.

    ``root/meta.json`` records the generator version and parameters; a complete dataset with the
    same ones is reused as is. Otherwise the dataset is written to a temporary sibling directory
    and renamed into place, so readers never see a half-written dataset; a file lock serialises
    concurrent callers (e.g. several DDP ranks). ``overwrite=True`` regenerates even a matching
    dataset. A non-empty ``root`` that is not a synthetic dataset is never deleted: that raises.

    Difficulty: each image holds 1 to ``max_objects`` objects; a placement that would hide more
    than ``max_occlusion`` of an earlier object's pixels is rejected; ``clutter`` is the most
    distractors per image (2 to ``clutter`` are drawn, 0 draws none); ``size_probs`` weights the
    small / medium / large strata (renormalised over the strata that fit the image). Parameters
    left at their defaults are not written into ``meta.json``, so datasets made before these
    options existed stay valid.
    """
    root = Path(root).resolve()
    params = synthetic_params(num_train=num_train, num_val=num_val, image_size=image_size,
                              seed=seed, max_objects=max_objects, max_occlusion=max_occlusion,
                              clutter=clutter, size_probs=size_probs)
    paths = SyntheticPaths.under(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock_path(root)):
        status = _cache_status(root, params)
        if status == "foreign":
            raise ValueError(
                f"{root} exists, is not empty and has no {FORMAT_NAME} meta.json; refusing to "
                f"replace it with a synthetic dataset (choose another root)"
            )
        if status == "valid" and not overwrite:
            logger.info("reusing synthetic COCO dataset at %s", root)
            return paths
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            start = time.perf_counter()
            meta = _generate(tmp, params)
            elapsed = time.perf_counter() - start
            os.chmod(tmp, 0o755)
            _replace_dir(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    stats = meta["stats"]
    logger.info(
        "generated synthetic COCO dataset at %s in %.1f s: train %d images / %d objects, "
        "val %d images / %d objects, %d placements dropped",
        root,
        elapsed,
        num_train,
        stats["train"]["objects"],
        num_val,
        stats["val"]["objects"],
        stats["train"]["dropped"] + stats["val"]["dropped"],
    )
    return paths


def synthetic_params(
    *, num_train: int = 512, num_val: int = 128, image_size: int = 256, seed: int = 0,
    max_objects: int = 8, max_occlusion: float = MAX_OCCLUSION, clutter: int = MAX_CLUTTER,
    size_probs: tuple[float, float, float] | list[float] = SIZE_PROBS,
) -> dict[str, Any]:
    """The checked parameters of ``make_synthetic_coco`` as recorded in ``meta.json`` (the
    difficulty options only where they differ from the defaults); ``ValueError`` naming the
    parameter for a bad one."""
    params = _check_params(num_train, num_val, image_size, seed, max_objects)
    params.update(_check_difficulty(max_occlusion, clutter, size_probs))
    return params


def _check_params(
    num_train: int, num_val: int, image_size: int, seed: int, max_objects: int
) -> dict[str, Any]:
    checks = {
        "num_train": (num_train, 1, "at least 1"),
        "num_val": (num_val, 1, "at least 1"),
        "image_size": (image_size, 64, "at least 64"),
        "seed": (seed, 0, "non-negative"),
        "max_objects": (max_objects, 1, "at least 1"),
    }
    for name, (value, low, expected) in checks.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"make_synthetic_coco: {name}={value!r}; expected an integer {expected}"
            )
    return {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "max_objects": max_objects,
    }


def _check_difficulty(
    max_occlusion: float, clutter: int, size_probs: tuple[float, float, float] | list[float]
) -> dict[str, Any]:
    """The difficulty options that differ from the defaults, validated (see make_synthetic_coco)."""
    if isinstance(max_occlusion, bool) or not isinstance(max_occlusion, int | float) or not (
        0.0 <= max_occlusion <= 1.0
    ):
        raise ValueError(
            f"make_synthetic_coco: max_occlusion={max_occlusion!r}; expected a number in [0, 1]"
        )
    if isinstance(clutter, bool) or not isinstance(clutter, int) or clutter < 0:
        raise ValueError(
            f"make_synthetic_coco: clutter={clutter!r}; expected a non-negative integer"
        )
    probs = list(size_probs) if isinstance(size_probs, list | tuple) else None
    if (
        probs is None
        or len(probs) != 3
        or any(isinstance(p, bool) or not isinstance(p, int | float) or p < 0 for p in probs)
        or sum(probs) <= 0
    ):
        raise ValueError(
            f"make_synthetic_coco: size_probs={size_probs!r}; expected three non-negative "
            "weights (small, medium, large) with a positive sum"
        )
    out: dict[str, Any] = {}
    if float(max_occlusion) != MAX_OCCLUSION:
        out["max_occlusion"] = float(max_occlusion)
    if clutter != MAX_CLUTTER:
        out["clutter"] = clutter
    if [float(p) for p in probs] != list(SIZE_PROBS):
        out["size_probs"] = [float(p) for p in probs]
    return out


def _cache_status(root: Path, params: dict[str, Any]) -> str:
    """'missing', 'valid', 'stale' (ours, other parameters or incomplete) or 'foreign'."""
    if not root.exists():
        return "missing"
    if not root.is_dir():
        return "foreign"
    meta_file = root / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return "foreign" if any(root.iterdir()) else "missing"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        return "foreign"
    if meta.get("version") != GENERATOR_VERSION or meta.get("params") != params:
        return "stale"
    paths = SyntheticPaths.under(root)
    for ann, images, n in (
        (paths.train_ann, paths.train_images, params["num_train"]),
        (paths.val_ann, paths.val_images, params["num_val"]),
    ):
        if not ann.is_file() or not images.is_dir() or len(list(images.glob("*.png"))) != n:
            return "stale"
    return "valid"


def _replace_dir(new: Path, root: Path) -> None:
    """Move ``new`` to ``root``, replacing an existing (stale) ``root`` with two renames."""
    if root.exists():
        old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
        root.rename(old)
        new.rename(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(root)
