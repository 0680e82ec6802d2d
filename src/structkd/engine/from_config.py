"""The config path: a ``Config`` (YAML + overrides) -> data, models, teacher -> ``engine.run``.

What the CLI's ``train``, ``distill`` and ``eval`` call; each is a few lines over the object
API (``structkd.fit``) and the loaders of ``structkd.models``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ..config import Config
from ..data import CocoDetection
from ..evaluation import evaluate_model
from ..models import DetectorInfo, DetectorSpec, build_detector, load_detector, torchvision_detector
from .data import limit, load_datasets, make_loader, resolve_data
from .fit import RunResult, run
from .module import EvalInfo

logger = logging.getLogger("structkd.engine")

__all__ = ["distill", "evaluate", "load_teacher", "run_config", "train"]


def _spec(cfg: Config, num_classes: int) -> DetectorSpec:
    import dataclasses

    return DetectorSpec(num_classes=num_classes, **dataclasses.asdict(cfg.model))


def _eval_info(train: CocoDetection, val: CocoDetection) -> EvalInfo:
    return EvalInfo(val.coco_gt, dict(train.label_to_cat_id), list(train.class_names))


def check_labels(info: DetectorInfo, data: CocoDetection, role: str) -> None:
    """The detector's label map must be the dataset's: same ids under the same labels, same
    names (a mismatch names the classes, not only the count)."""
    ours = {label: (data.label_to_cat_id[label], data.class_names[label])
            for label in range(1, data.num_classes)}
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


def load_teacher(cfg: Config) -> tuple[nn.Module, DetectorInfo]:
    """The teacher named by ``cfg.teacher``: an export, a checkpoint or a torchvision builder."""
    t = cfg.teacher
    if t.checkpoint and t.torchvision:
        raise ValueError("teacher.checkpoint and teacher.torchvision are both set; expected one")
    if t.torchvision:
        model, info = torchvision_detector(t.torchvision, t.weights, num_classes=t.num_classes)
    elif t.checkpoint:
        if t.weights:
            raise ValueError("teacher.weights goes with teacher.torchvision, not with "
                             "teacher.checkpoint")
        model, info = load_detector(t.checkpoint)
    else:
        raise ValueError("distillation needs a teacher: teacher.checkpoint (a structkd export or "
                         ".ckpt) or teacher.torchvision (+ teacher.weights)")
    logger.info("teacher: %s", info.source)
    return model, info


def run_config(cfg: Config, *, callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Train (``distill.method: none``) or distil, as the config says."""
    paths = resolve_data(cfg.data)
    train_ds, val_ds = load_datasets(cfg.data, paths)
    spec = _spec(cfg, train_ds.num_classes)
    from .hazards import cpu_bf16_hazard

    hazard = cpu_bf16_hazard(cfg, spec)
    if hazard:
        logger.warning(hazard)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # the student's init
    student = build_detector(spec)
    teacher = None
    if cfg.distill.method != "none":
        teacher, info = load_teacher(cfg)
        if cfg.teacher.strict_classes:
            check_labels(info, train_ds, "teacher")
    return run(cfg, student, train_ds, val_ds, teacher=teacher,
               eval_info=_eval_info(train_ds, val_ds), spec=spec, callbacks=callbacks)


def train(cfg: Config) -> RunResult:
    """Train a plain detector (a teacher, or the no-distillation baseline student)."""
    cfg.distill.method = "none"
    return run_config(cfg)


def distill(cfg: Config) -> RunResult:
    """Distil the configured teacher into the student described by ``cfg.model``."""
    return run_config(cfg)


def evaluate(checkpoint: str | Path, cfg: Config, *, out_json: str | Path | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """COCO box metrics of a saved detector on ``cfg``'s val split, with its own label map."""
    if out_json is not None and Path(out_json).is_dir():
        raise ValueError(f"--out {out_json} is a directory; expected a JSON file path")
    model, info = load_detector(checkpoint)
    paths = resolve_data(cfg.data)
    train_ds, val_ds = load_datasets(cfg.data, paths, check=("val",))
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
    loader = make_loader(limit(val_ds, cfg.data.limit_val), batch_size=cfg.data.val_batch_size,
                         num_workers=cfg.data.num_workers, shuffle=False, seed=0)
    l2c = info.label_to_cat_id or dict(train_ds.label_to_cat_id)
    names = {l2c[label]: name for label, name in enumerate(info.class_names or
                                                           train_ds.class_names) if label in l2c}
    metrics = evaluate_model(model.to(torch.device(device)), loader, coco_gt=val_ds.coco_gt,
                             label_to_cat_id=l2c, class_names=names, device=device,
                             progress=cfg.trainer.progress)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(metrics, indent=2))
    return metrics
