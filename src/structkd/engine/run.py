"""The Python API behind the CLI: ``train``, ``distill``, ``evaluate`` and ``load_detector``.

A run writes into ``trainer.out_dir``: ``config.yaml`` (the resolved config), ``checkpoints/``
(Lightning checkpoints without the teacher), ``metrics.csv`` and TensorBoard logs,
``student.safetensors`` + ``student.json`` (the final detector) and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from ..config import Config
from ..data import CocoDetection
from ..evaluation import evaluate_model
from ..models import DetectorSpec, build_detector, count_parameters, export_student, load_exported
from .data import DataPaths, limit, load_datasets, make_loader, resolve_data
from .module import DetectionModule

logger = logging.getLogger("structkd.engine")


@dataclass
class RunResult:
    """What a run produced: final COCO metrics, the exported student and step timing."""

    out_dir: Path
    metrics: dict[str, Any]
    export_prefix: Path | None
    step_time_s: float | None
    params: int
    extra: dict[str, Any] = field(default_factory=dict)


def load_detector(path: str | Path) -> tuple[nn.Module, DetectorSpec, dict[str, Any]]:
    """Load a detector from an export prefix (``x`` for ``x.safetensors``/``x.json``) or a
    Lightning ``.ckpt`` written by structkd; returns ``(model, spec, meta)`` in eval mode."""
    p = Path(path)
    if p.suffix == ".ckpt":
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        info = ckpt.get("structkd") if isinstance(ckpt, dict) else None
        if not info or "spec" not in info:
            raise ValueError(f"{p} is not a structkd checkpoint (no 'structkd' entry with a spec)")
        spec = DetectorSpec.from_dict(info["spec"])
        spec = DetectorSpec.from_dict({**spec.to_dict(), "weights": None,
                                       "backbone_weights": None})
        model = build_detector(spec)
        prefix = "net.student."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"{p}: weights do not fit a {spec.arch}/{spec.backbone} detector with "
                f"{spec.num_classes} classes: {str(e).splitlines()[0]}"
            ) from e
        return model.eval(), spec, {"class_names": info.get("class_names", [])}
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return load_exported(p)


def _eval_info(train: CocoDetection, val: CocoDetection) -> dict[str, Any]:
    return {
        "coco_gt": val.coco_gt,
        "label_to_cat_id": train.label_to_cat_id,
        "class_names": {i: n for i, n in enumerate(train.class_names) if i > 0},
        "class_names_list": train.class_names,
    }


class _DataModule(L.LightningDataModule):
    """Builds loaders once the strategy knows this process's rank and the world size."""

    def __init__(self, cfg: Config, train: CocoDetection, val: CocoDetection) -> None:
        super().__init__()
        self.cfg, self.train_ds, self.val_ds = cfg, train, val

    def _replicas(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def train_dataloader(self):
        d = self.cfg.data
        n, rank = self._replicas()
        return make_loader(limit(self.train_ds, d.limit_train), batch_size=d.batch_size,
                           num_workers=d.num_workers, shuffle=True,
                           seed=self.cfg.trainer.seed, num_replicas=n, rank=rank)

    def val_dataloader(self):
        d = self.cfg.data
        n, rank = self._replicas()
        return make_loader(limit(self.val_ds, d.limit_val), batch_size=d.val_batch_size,
                           num_workers=d.num_workers, shuffle=False, seed=0,
                           num_replicas=n, rank=rank)


def _build_spec(cfg: Config, num_classes: int) -> DetectorSpec:
    m = cfg.model
    return DetectorSpec(
        arch=m.arch, num_classes=num_classes, backbone=m.backbone, fpn_channels=m.fpn_channels,
        min_size=m.min_size, max_size=m.max_size, weights=m.weights,
        backbone_weights=m.backbone_weights, trainable_backbone_layers=m.trainable_backbone_layers,
        norm=m.norm, variant=m.variant, anchor_size=m.anchor_size,
    )


def _load_teacher(cfg: Config, num_classes: int) -> nn.Module:
    path = cfg.teacher.checkpoint
    if not path:
        raise ValueError("distillation needs teacher.checkpoint (an export prefix or a .ckpt)")
    teacher, spec, _ = load_detector(path)
    if cfg.teacher.strict_classes and spec.num_classes != num_classes:
        raise ValueError(
            f"teacher {path} was built for num_classes={spec.num_classes} but the dataset has "
            f"{num_classes} (incl. background); use a teacher trained on this label set, or set "
            "teacher.strict_classes=false to distil from its neck anyway"
        )
    logger.info("teacher: %s/%s from %s", spec.arch, spec.backbone, path)
    return teacher


def _trainer(cfg: Config, out_dir: Path) -> L.Trainer:
    """One trainer for fit and the final validation, so both log into the same CSV/TensorBoard
    files (a second trainer would start them afresh and lose the training curves)."""
    t, s = cfg.trainer, cfg.schedule
    # One rolling file, checkpoints/last.ckpt, rewritten every ``checkpoint_every`` epochs and at
    # the end (Lightning 2.6 writes save_last only next to a top-k save, so top-1 is used).
    # Saved at the end of the training epoch: with val_every=0 no validation runs while fitting,
    # and a validation-end save would never happen.
    ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="last", save_top_k=1,
                           enable_version_counter=False, every_n_epochs=t.checkpoint_every,
                           save_on_train_epoch_end=True)
    loggers = [CSVLogger(out_dir, name="", version=""),
               TensorBoardLogger(out_dir, name="tb", version="")]
    return L.Trainer(
        max_epochs=s.epochs, max_steps=s.max_steps or -1, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        gradient_clip_val=cfg.optim.grad_clip, deterministic=t.deterministic,
        # val_every=0: no validation while fitting (the final one still runs).
        check_val_every_n_epoch=t.val_every if t.val_every > 0 else s.epochs + 1,
        log_every_n_steps=t.log_every,
        enable_progress_bar=t.progress, use_distributed_sampler=False, default_root_dir=out_dir,
        num_sanity_val_steps=0, enable_model_summary=False, callbacks=[ckpt], logger=loggers,
    )


def cpu_bf16_hazard(cfg: Config, spec: DetectorSpec) -> str | None:
    """A warning for bf16 training on CPU at inputs of up to 64 px, else None.

    Seen with torch 2.14.1 on AVX-512 CPUs: oneDNN's bf16 convolution backward returns garbage
    (NaN, 1e19) weight gradients, at random, for a stride-2 convolution over a 1-pixel-wide
    input. RetinaNet and FCOS compute P7 that way from P6 (stride 64), so inputs of 64 px or
    less make training diverge after the first step; fp32 and larger inputs are unaffected.
    """
    t = cfg.trainer
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if not (on_cpu and str(t.precision).startswith("bf16") and spec.arch in ("retinanet", "fcos")
            and spec.min_size <= 64):
        return None
    return (f"trainer.precision={t.precision} on CPU with model.min_size={spec.min_size}: "
            "oneDNN's bf16 convolution backward gives random garbage gradients for the P7 "
            "convolution over a 1-pixel-wide P6 (torch 2.14.1); use min_size > 64 or "
            "precision 32-true")


def _resume_path(cfg: Config, out_dir: Path) -> str | None:
    r = cfg.trainer.resume
    if r is None:
        return None
    path = out_dir / "checkpoints" / "last.ckpt" if r == "last" else Path(r)
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={r!r}: checkpoint {path} does not exist")
    return str(path)


def fit(cfg: Config, *, distill: bool) -> RunResult:
    """Train a detector (``distill=False``) or distil a teacher into it; see the module doc."""
    t = cfg.trainer
    if t.threads:
        torch.set_num_threads(t.threads)
    out_dir = Path(t.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    L.seed_everything(t.seed, workers=True, verbose=False)
    paths: DataPaths = resolve_data(cfg.data)
    train_ds, val_ds = load_datasets(cfg.data, paths)
    spec = _build_spec(cfg, train_ds.num_classes)
    hazard = cpu_bf16_hazard(cfg, spec)
    if hazard:
        logger.warning(hazard)
    student = build_detector(spec)
    teacher = _load_teacher(cfg, train_ds.num_classes) if distill else None
    module = DetectionModule(
        student, spec, teacher=teacher, distill=cfg.distill, optim=cfg.optim,
        schedule=cfg.schedule, eval_info=_eval_info(train_ds, val_ds),
    )
    data = _DataModule(cfg, train_ds, val_ds)
    trainer = _trainer(cfg, out_dir)
    trainer.fit(module, datamodule=data, ckpt_path=_resume_path(cfg, out_dir))
    if module.metrics_step != trainer.global_step:  # the last epoch was not validated yet
        trainer.validate(module, datamodule=data, verbose=False)
    metrics = module.last_metrics
    step_time = statistics.median(module.step_times) if module.step_times else None
    result = RunResult(out_dir, metrics, None, step_time, count_parameters(student))
    if trainer.is_global_zero:
        result.export_prefix = out_dir / "student"
        export_student(student, spec, result.export_prefix, extra_meta={
            "class_names": train_ds.class_names,
            "label_to_cat_id": {str(k): v for k, v in train_ds.label_to_cat_id.items()},
            "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        })
        summary = {
            "mode": "distill" if distill else "train",
            "metrics": metrics, "step_time_s": step_time, "params": result.params,
            "steps": trainer.global_step, "export": str(result.export_prefix),
        }
        (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return result


def train(cfg: Config) -> RunResult:
    """Train a plain detector (a teacher, or the no-distillation baseline student)."""
    return fit(cfg, distill=False)


def distill(cfg: Config) -> RunResult:
    """Distil ``cfg.teacher.checkpoint`` into the student described by ``cfg.model``."""
    if cfg.distill.distance == "none":
        return fit(cfg, distill=False)
    return fit(cfg, distill=True)


def evaluate(checkpoint: str | Path, cfg: Config, *, out_json: str | Path | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """COCO box metrics of a saved detector on ``cfg``'s val split."""
    model, spec, _ = load_detector(checkpoint)
    paths = resolve_data(cfg.data)
    train_ds, val_ds = load_datasets(cfg.data, paths)
    if spec.num_classes != train_ds.num_classes:
        raise ValueError(
            f"{checkpoint} was built for num_classes={spec.num_classes} but the dataset has "
            f"{train_ds.num_classes} (incl. background)"
        )
    loader = make_loader(limit(val_ds, cfg.data.limit_val), batch_size=cfg.data.val_batch_size,
                         num_workers=cfg.data.num_workers, shuffle=False, seed=0)
    info = _eval_info(train_ds, val_ds)
    metrics = evaluate_model(model.to(device), loader, coco_gt=info["coco_gt"],
                             label_to_cat_id=info["label_to_cat_id"],
                             class_names=info["class_names"], device=device,
                             progress=cfg.trainer.progress)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(metrics, indent=2))
    return metrics
