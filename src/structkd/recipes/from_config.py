"""The config path: a ``Config`` (YAML + overrides) -> datasets, detectors, teacher -> ``fit``.

What the CLI's ``train``, ``distill`` and ``eval`` call; each is a few lines over the object API
(``fit``, ``evaluate``) and the loaders of ``structkd.models``. ``run_config`` is the one verb
for configs: it trains plainly when ``distill.method`` is "none" and distils otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ..checks import writable_file
from ..config import ConfigError, part
from ..data import CocoDetection, build_transforms, make_synthetic_coco
from ..detectors import builds_random_weights, family_detector
from ..distill import TeacherCache, write_teacher_cache
from ..distill.teacher_cache import check_writer_options, read_sources
from ..engine.evaluate import evaluate
from ..engine.fit import DISTILLER_OPTIONS, fit
from ..engine.monitor.hazards import cpu_bf16_hazard
from ..engine.options import Balance, Loader
from ..engine.runs.results import RunResult
from ..engine.runs.resume import run_options
from ..engine.runs.run_dir import check_out_dir
from ..engine.training.data_order import limit
from ..labels import label_map
from ..models import DetectorInfo, build_detector, load_detector, torchvision_detector
from .cache_config import (
    check_cacheable,
    expected_key,
    image_table,
    open_teacher_cache,
    teacher_taps,
)
from .schema import Augment, Config

logger = logging.getLogger("structkd.engine")

__all__ = ["DataPathsResolved", "build_run", "check_labels", "evaluate_checkpoint",
           "load_datasets", "load_teacher", "resolve_data", "run_config"]


@dataclass(frozen=True)
class DataPathsResolved:
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


def resolve_data(cfg: Config) -> DataPathsResolved:
    """The annotation/image paths of a config; the built-in dataset only when none is given."""
    d = cfg.data
    keys = ("train_ann", "train_images", "val_ann", "val_images")
    if all(getattr(d, k) is None for k in keys):
        s = asdict(d.synthetic)
        root = Path(s.pop("root")).expanduser()
        logger.info("data: no data paths given (data.train_ann, ...); using the built-in "
                    "synthetic dataset in %s", root)
        try:
            p = make_synthetic_coco(root, **s)
        except ValueError as e:
            raise ConfigError(f"data.synthetic: {e}") from None
        return DataPathsResolved(p.train_ann, p.train_images, p.val_ann, p.val_images)
    return DataPathsResolved(*(Path(getattr(d, k)).expanduser() for k in keys))


def load_datasets(cfg: Config, paths: DataPathsResolved, *,
                  check: tuple[str, ...] = ("train", "val")) -> tuple[CocoDetection, CocoDetection]:
    """Train and val COCO datasets sharing the train split's category mapping.

    The image files of the splits named in ``check`` are checked up front (exist, readable
    header, annotated size; ``CocoDetection.check_images``): a bad validation image fails the
    run now, not after an epoch of training. The problems of both splits are reported together.
    (Evaluation reads only the train split's categories and may pass ``check=("val",)``.)
    """
    unknown = sorted(set(check) - {"train", "val"})
    if unknown:
        raise ValueError(f"load_datasets(check={check!r}): unknown split(s) {unknown}; expected "
                         "'train' and/or 'val'")
    train = CocoDetection(paths.train_ann, paths.train_images,
                          build_transforms(True, **asdict(part(cfg.data, Augment))))
    val = CocoDetection(paths.val_ann, paths.val_images, build_transforms(False),
                        categories=train.coco_gt["categories"])
    problems = []
    for split in [d for name, d in (("train", train), ("val", val)) if name in check]:
        try:
            split.check_images()
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; and ".join(problems))
    logger.info("data: %d train images, %d val images, %d classes",
                len(train), len(val), train.num_classes - 1)
    return train, val


def check_labels(info: DetectorInfo, data: CocoDetection, role: str) -> None:
    """The detector's label map must be the dataset's: same ids under the same labels, same
    names (a mismatch names the classes, not only the count)."""
    ours = label_map(data.class_names, data.label_to_cat_id)
    theirs = info.label_map()
    if not theirs:
        if info.spec is not None and info.spec.num_classes != data.num_classes:
            raise ValueError(
                f"{role} {info.source} was built for num_classes={info.spec.num_classes} but "
                f"the dataset has {data.num_classes} (incl. background); use a {role} trained "
                "on this label set, or set teacher.strict_classes=false to distil from its "
                "features anyway")
        return
    if theirs != ours:
        only_theirs = {k: v for k, v in theirs.items() if ours.get(k) != v}
        only_ours = {k: v for k, v in ours.items() if theirs.get(k) != v}
        show = lambda d: ", ".join(f"{k}: {v[1]} (id {v[0]})" for k, v in list(d.items())[:6])  # noqa: E731
        raise ValueError(
            f"{role} {info.source} was trained on other classes than {data.ann_file}: "
            f"{role} label -> name (category id): {show(only_theirs) or 'none'}; data: "
            f"{show(only_ours) or 'none'} ({len(theirs)} vs {len(ours)} classes). Use a "
            f"{role} trained on this label set, or set teacher.strict_classes=false to distil "
            "from its features anyway"
        )


def load_teacher(cfg: Config, num_classes: int | None = None) -> tuple[nn.Module, DetectorInfo]:
    """The teacher named by ``cfg.teacher``: an export, a checkpoint, a torchvision builder, or
    another family's builder (its class head for ``teacher.num_classes``, else ``num_classes``:
    the dataset's)."""
    t = cfg.teacher
    untrained = (t.torchvision and not t.weights) or (
        t.family and builds_random_weights(t.family, str(t.name)))
    if untrained and not t.allow_untrained:
        what = (f"teacher.torchvision={t.torchvision!r} without teacher.weights" if t.torchvision
                else f"teacher.name={t.name!r} (a {t.family} model built from its "
                     "configuration)")
        raise ValueError(f"{what} has random weights: an untrained teacher only teaches "
                         "noise; give a trained teacher (a checkpoint, a weights file, a "
                         "trained .pt or folder), or set teacher.allow_untrained=true for a "
                         "smoke test")
    if t.torchvision:
        model, info = torchvision_detector(t.torchvision, t.weights, num_classes=t.num_classes)
    elif t.checkpoint:
        model, info = load_detector(t.checkpoint)
    elif t.family:
        classes = t.num_classes or num_classes
        if classes is None:
            raise ValueError(f"teacher.family={t.family!r} needs teacher.num_classes (or the "
                             "dataset's class count)")
        model = family_detector(t.family, str(t.name), int(classes),
                                options_key="teacher.options", **t.options)
        info = DetectorInfo(source=f"{t.family} {t.name}",
                            meta={"family": {"adapter": t.family, "name": t.name}})
        logger.info("teacher: %s with a class head for %d classes (background included; a "
                    "feature teacher never runs it)", info.source, classes)
        return model, info
    else:
        raise ValueError("distillation needs a teacher: teacher.checkpoint (a structkd export or "
                         ".ckpt), teacher.torchvision (+ teacher.weights) or teacher.family + "
                         "teacher.name")
    logger.info("teacher: %s", info.source)
    return model, info


@dataclass
class Run:
    """The objects a config describes, built as ``run_config`` builds them."""

    student: nn.Module
    train: CocoDetection
    val: CocoDetection
    teacher: nn.Module | TeacherCache | None


def build_student(cfg: Config, num_classes: int) -> nn.Module:
    """The student ``cfg.model`` describes: structkd's torchvision builder from its spec, or
    the builder of its family (``model.family`` / ``model.name`` / ``model.size``)."""
    spec = cfg.spec(num_classes)
    if spec is not None:
        return build_detector(spec)
    m = cfg.model
    return family_detector(m.family, m.name, num_classes, size=m.size, min_size=m.min_size,
                           max_size=m.max_size, options_key="model.options", **m.options)


def build_run(cfg: Config) -> Run:
    """Datasets, the student (seeded by ``trainer.seed``, as the run initialises it) and, unless
    ``distill.method`` is "none", the teacher (its label map checked against the data)."""
    train_ds, val_ds = load_datasets(cfg, resolve_data(cfg))
    spec = cfg.spec(train_ds.num_classes)
    hazard = cpu_bf16_hazard(cfg.trainer, spec) if spec is not None else None
    if hazard:
        logger.warning(hazard)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # the student's init
    student = build_student(cfg, train_ds.num_classes)
    teacher: nn.Module | TeacherCache | None = None
    if cfg.distill.method != "none" and cfg.teacher.cache:
        teacher = open_teacher_cache(cfg, student, train_ds)
    elif cfg.distill.method != "none":
        teacher, info = load_teacher(cfg, train_ds.num_classes)
        if cfg.teacher.strict_classes:
            check_labels(info, train_ds, "teacher")
    return Run(student, train_ds, val_ds, teacher)


def run_config(cfg: Config, *, callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Train (``distill.method: none``) or distil, as the config says."""
    check_out_dir(cfg.trainer.out_dir)  # before the data is read and the models built
    run = build_run(cfg)
    d = cfg.distill
    distiller = {n: getattr(d, n) for n in DISTILLER_OPTIONS}
    return fit(run.student, run.train, run.val, teacher=run.teacher, method=d.method,
               method_options=d.options, optim=cfg.optim, schedule=cfg.schedule,
               loader=cfg.loader(), trainer=cfg.trainer, balance=part(d, Balance),
               spec=cfg.spec(run.train.num_classes), callbacks=callbacks,
               record=cfg.to_dict(), identity=run_options(cfg), **distiller)


def evaluate_checkpoint(checkpoint: str | Path, cfg: Config, *,
                        out_json: str | Path | None = None,
                        device: str = "cpu") -> dict[str, Any]:
    """COCO box metrics of a saved detector on ``cfg``'s val split, with its own label map."""
    out_path = writable_file(out_json, "--out") if out_json is not None else None
    model, info = load_detector(checkpoint)
    train_ds, val_ds = load_datasets(cfg, resolve_data(cfg), check=("val",))
    check_labels(info, train_ds, "detector")
    if info.spec is not None and info.spec.num_classes != train_ds.num_classes:
        raise ValueError(
            f"{checkpoint} was built for num_classes={info.spec.num_classes} but the dataset has "
            f"{train_ds.num_classes} (incl. background)"
        )
    if info.spec is not None and (info.spec.arch, info.spec.backbone) != (
            cfg.model.arch, cfg.model.backbone) and cfg.model.arch:
        logger.warning("the config describes a %s/%s but %s is a %s/%s; evaluating the "
                       "checkpoint as saved", cfg.model.arch, cfg.model.backbone, checkpoint,
                       info.spec.arch, info.spec.backbone)
    loader = part(cfg.data, Loader)
    metrics = evaluate(model, limit(val_ds, loader.limit_val), batch_size=loader.val_batch_size,
                       num_workers=loader.num_workers, device=torch.device(device),
                       class_names=info.class_names or None,
                       label_to_cat_id=info.label_to_cat_id or None,
                       progress=cfg.trainer.progress)
    if out_path is not None:
        out_path.write_text(json.dumps(metrics, indent=2))
    return metrics


def cache_teacher(cfg: Config, out: str | os.PathLike, *, batch_size: int = 8,
                  progress: bool = True) -> TeacherCache:
    """Write the cache of ``cfg``'s teacher over its training split into ``out``."""
    check_writer_options(out, batch_size=batch_size)
    check_cacheable(cfg)
    if cfg.teacher.cache:
        raise ValueError("teacher.cache is set: name the teacher to cache with "
                         "teacher.checkpoint, teacher.torchvision or teacher.family + name")
    paths = resolve_data(cfg)
    train, _ = load_datasets(cfg, paths, check=("train",))
    plain = CocoDetection(paths.train_ann, paths.train_images, build_transforms(False))
    student = build_student(cfg, train.num_classes)  # only its transform is used
    teacher, _ = load_teacher(cfg, train.num_classes)
    images = image_table(train, read_sources(Path(out).expanduser()))
    key = expected_key(cfg, student, train, teacher, images=images)
    layers, root = teacher_taps(cfg, teacher)
    return write_teacher_cache(out, student, teacher, plain, key=key,
                               teacher_layers=layers, teacher_root=root,
                               batch_size=batch_size, sources=images, progress=progress)
