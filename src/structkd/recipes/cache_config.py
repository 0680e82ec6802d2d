"""The config path of the teacher cache: the key a config's run needs, and opening the cache a
config with ``teacher.cache`` trains from (the teacher is then never built); ``structkd
cache-teacher`` writes it (:func:`structkd.recipes.from_config.cache_teacher`).

The cache's key is derived from the config: the teacher's weights, ``distill.teacher_layers`` /
``teacher_root`` / ``teacher_dtype``, the student's transform (``model.min_size``, ...), the
training annotation file, image folder and the images' contents, the variants the augmentation
can draw, and ``teacher.cache_dtype`` (a run states the precision it trains from, so its
recorded config says it). Only augmentation with a finite set of outcomes can be replayed: the
flip (``data.hflip_prob``); ``data.scale_range`` other than ``[1, 1]`` draws a continuous scale
and is refused.

The images' contents: hashed once when the cache is written (2600 demo images, 83 MiB: 0.09 s
measured; COCO's 118k train images, 18 GB: about 12 s at the 1.5 GB/s sha256 measured here,
more from a cold disk, beside the teacher's pass over them); the cache keeps each file's size,
mtime and digest, and a run from it stats every image (2600: 8 ms measured; 118k: about 0.4 s,
extrapolated) and re-hashes only those whose size or mtime changed, naming the ones whose
content did. An image replaced under the same size and mtime (set back on purpose) is not seen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..data import CocoDetection
from ..detectors import family_defaults
from ..distill import TeacherCache, cache_key, file_digest
from ..distill.teacher_cache import file_table, table_digest
from .schema import Config

logger = logging.getLogger("structkd.engine")

__all__ = ["check_cacheable", "expected_key", "image_table", "open_teacher_cache",
           "teacher_taps"]


def check_cacheable(cfg: Config) -> None:
    """Refuse a config whose augmentation a cache cannot replay, naming the option."""
    lo, hi = (float(v) for v in cfg.data.scale_range)
    if (lo, hi) != (1.0, 1.0):
        raise ValueError(f"data.scale_range={[lo, hi]} draws a continuous scale per image, which "
                         "a teacher cache cannot replay; set data.scale_range=[1, 1] to cache "
                         "the teacher (flips, data.hflip_prob, are replayed)")


def image_table(train: CocoDetection, known: list[list[Any]] | None) -> list[list[Any]]:
    """The training images' :func:`file_table` (``known``: a cache's, to skip unchanged files)."""
    return file_table([train.image_path(i) for i in range(len(train))], known)


def _data_key(train: CocoDetection, images: list[list[Any]]) -> dict[str, Any]:
    return {"train_ann": file_digest(train.ann_file), "images": len(train),
            "image_dir": str(Path(train.image_dir).resolve()), "image_files": table_digest(images)}


def teacher_taps(cfg: Config, teacher: nn.Module | TeacherCache) -> tuple[Any, str]:
    """(layers, root) of the teacher: the config's, else the teacher family's defaults (for a
    cache, the ones it was written with)."""
    d = cfg.distill
    if isinstance(teacher, TeacherCache):
        root, layers = teacher.teacher_defaults
    else:
        root, layers = family_defaults(teacher)
    return (d.teacher_layers if d.teacher_layers is not None else layers,
            d.teacher_root if d.teacher_root is not None else root)


def expected_key(cfg: Config, student: nn.Module, train: CocoDetection,
                 teacher: nn.Module | TeacherCache, *,
                 images: list[list[Any]] | None = None) -> dict[str, Any]:
    """The cache key a run of ``cfg`` needs (``teacher``: the model, or the cache opened;
    ``images``: the training images' table if known, else every image is hashed)."""
    d = cfg.distill
    images = image_table(train, None) if images is None else images
    layers, root = teacher_taps(cfg, teacher)
    return cache_key(teacher=teacher.teacher_fingerprint if isinstance(teacher, TeacherCache)
                     else teacher, student=student, teacher_layers=layers,
                     teacher_root=root, teacher_dtype=d.teacher_dtype,
                     data=_data_key(train, images), hflip=cfg.data.hflip_prob > 0,
                     dtype=cfg.teacher.cache_dtype)


def _check_images(cache: TeacherCache, images: list[list[Any]],
                  known: list[list[Any]] | None) -> None:
    """Refuse a cache written from images whose content changed since, naming them (other
    differences of the data are named by ``cache.check``)."""
    if known is None or table_digest(images) == cache.key["data"].get("image_files"):
        return
    changed = [row[0] for row, old in zip(images, known, strict=False)
               if row[0] == old[0] and row[3] != old[3]]
    if changed:
        raise ValueError(f"teacher cache {cache.root} was written from other image files: "
                         f"{len(changed)} of {len(images)} changed since (e.g. {changed[0]}), "
                         "its levels are of the old images; write the cache again with "
                         "`structkd cache-teacher`")


def open_teacher_cache(cfg: Config, student: nn.Module, train: CocoDetection) -> TeacherCache:
    """The cache ``teacher.cache`` names, checked against this run's setting."""
    check_cacheable(cfg)
    assert cfg.teacher.cache is not None
    cache = TeacherCache(cfg.teacher.cache)
    stored = cache.key.get("dtype")
    if stored != cfg.teacher.cache_dtype:
        raise ValueError(f"teacher cache {cache.root} holds {stored} levels, this run has "
                         f"teacher.cache_dtype={cfg.teacher.cache_dtype}: set "
                         f"teacher.cache_dtype={stored} (--set teacher.cache_dtype={stored}) to "
                         "train from it")
    known = cache.sources
    images = image_table(train, known)
    _check_images(cache, images, known)
    cache.check(expected_key(cfg, student, train, cache, images=images))
    logger.info("teacher: the cached levels in %s (%d images x %d variant(s); the teacher "
                "itself is not built)", cache.root, len(cache.index), len(cache.variants))
    return cache
