"""The config path of the teacher cache: ``structkd cache-teacher`` writes it, a config with
``teacher.cache`` trains from it (the teacher is then never built).

The cache's key is derived from the config: the teacher's weights, ``distill.teacher_layers`` /
``teacher_root`` / ``teacher_dtype``, the student's transform (``model.min_size``, ...), the
training annotation file and image folder, and the variants the augmentation can draw. Only
augmentation with a finite set of outcomes can be replayed: the flip (``data.hflip_prob``);
``data.scale_range`` other than ``[1, 1]`` draws a continuous scale and is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..data import CocoDetection, build_transforms
from ..detectors import family_defaults
from ..distill import TeacherCache, cache_key, file_digest, write_teacher_cache
from .from_config import build_student, load_datasets, load_teacher, resolve_data
from .recipe import Config

logger = logging.getLogger("structkd.engine")

__all__ = ["cache_teacher", "check_cacheable", "expected_key", "open_teacher_cache"]


def check_cacheable(cfg: Config) -> None:
    """Refuse a config whose augmentation a cache cannot replay, naming the option."""
    lo, hi = (float(v) for v in cfg.data.scale_range)
    if (lo, hi) != (1.0, 1.0):
        raise ValueError(f"data.scale_range={[lo, hi]} draws a continuous scale per image, which "
                         "a teacher cache cannot replay; set data.scale_range=[1, 1] to cache "
                         "the teacher (flips, data.hflip_prob, are replayed)")


def _data_key(train: CocoDetection) -> dict[str, Any]:
    return {"train_ann": file_digest(train.ann_file), "images": len(train),
            "image_dir": str(Path(train.image_dir).resolve())}


def _teacher_taps(cfg: Config, teacher: nn.Module | TeacherCache) -> tuple[Any, str]:
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
                 teacher: nn.Module | TeacherCache) -> dict[str, Any]:
    """The cache key a run of ``cfg`` needs (``teacher``: the model, or the cache opened)."""
    d = cfg.distill
    layers, root = _teacher_taps(cfg, teacher)
    return cache_key(teacher=teacher.teacher_fingerprint if isinstance(teacher, TeacherCache)
                     else teacher, student=student, teacher_layers=layers,
                     teacher_root=root, teacher_dtype=d.teacher_dtype,
                     data=_data_key(train), hflip=cfg.data.hflip_prob > 0,
                     dtype=cfg.teacher.cache_dtype)


def cache_teacher(cfg: Config, out: str | os.PathLike, *, batch_size: int = 8,
                  progress: bool = True) -> TeacherCache:
    """Write the cache of ``cfg``'s teacher over its training split into ``out``."""
    check_cacheable(cfg)
    if cfg.teacher.cache:
        raise ValueError("teacher.cache is set: name the teacher to cache with "
                         "teacher.checkpoint, teacher.torchvision or teacher.family + name")
    paths = resolve_data(cfg)
    train, _ = load_datasets(cfg, paths, check=("train",))
    plain = CocoDetection(paths.train_ann, paths.train_images, build_transforms(False))
    student = build_student(cfg, train.num_classes)  # only its transform is used
    teacher, _ = load_teacher(cfg, train.num_classes)
    key = expected_key(cfg, student, train, teacher)
    layers, root = _teacher_taps(cfg, teacher)
    return write_teacher_cache(out, student, teacher, plain, key=key,
                               teacher_layers=layers, teacher_root=root,
                               batch_size=batch_size, progress=progress)


def open_teacher_cache(cfg: Config, student: nn.Module, train: CocoDetection) -> TeacherCache:
    """The cache ``teacher.cache`` names, checked against this run's setting."""
    check_cacheable(cfg)
    assert cfg.teacher.cache is not None
    cache = TeacherCache(cfg.teacher.cache)
    cache.check(expected_key(cfg, student, train, cache))
    logger.info("teacher: the cached levels in %s (%d images x %d variant(s); the teacher "
                "itself is not built)", cache.root, len(cache.index), len(cache.variants))
    return cache
