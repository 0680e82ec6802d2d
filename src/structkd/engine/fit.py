"""``fit``: train or distil a detector the user built, on datasets the user made, with Lightning.

    structkd.fit(student, train_ds, val_ds, teacher=teacher, method="ssim", epochs=12, lr=0.01)

The config and CLI path (``structkd.engine.run_config``) is a thin layer over this function. A
run writes into its output directory: ``config.yaml``, ``checkpoints/last.ckpt`` (without the
teacher), ``metrics.csv`` and TensorBoard logs, ``student.safetensors`` + ``student.json`` and
``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import Dataset

from .. import __version__
from ..config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainerConfig, _coerce
from ..distill import DetectorLosses, Distiller, unwrap, weights_fingerprint
from ..methods import DistillMethod
from ..models import DetectorSpec, count_parameters, export_student
from .callbacks import DivergenceGuard, SafeCheckpoint
from .data import limit, make_loader
from .evalinfo import eval_info_for
from .module import DetectionModule, EvalInfo
from .run_dir import csv_logger, open_csv_logger, prepare_out_dir

logger = logging.getLogger("structkd.engine")

__all__ = ["RunResult", "fit", "run"]

# Keyword options of ``fit`` and the config section each belongs to.
_SECTIONS: dict[str, tuple[str, type]] = {}
for _section, _cls in (("trainer", TrainerConfig), ("optim", OptimConfig),
                       ("schedule", ScheduleConfig)):
    for _f in dataclasses.fields(_cls):
        _SECTIONS[_f.name] = (_section, _cls)
_SECTIONS["optimizer"] = ("optim", OptimConfig)  # optim.name, spelled unambiguously
for _name in ("batch_size", "val_batch_size", "num_workers", "limit_train", "limit_val",
              "persistent_workers"):
    _SECTIONS[_name] = ("data", DataConfig)


@dataclass
class RunResult:
    """What a run produced: final COCO metrics, the exported student and step timing."""

    out_dir: Path
    metrics: dict[str, Any]
    export_prefix: Path | None
    step_time_s: float | None
    params: int
    extra: dict[str, Any] = field(default_factory=dict)


def _apply_options(cfg: Config, options: Mapping[str, Any]) -> Config:
    """Set ``fit``'s keyword options on a copy of ``cfg``, type-checked like the YAML keys."""
    import typing

    cfg = dataclasses.replace(cfg)
    for section in ("data", "trainer", "optim", "schedule", "distill"):
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section)))
    unknown = sorted(k for k in options if k not in _SECTIONS)
    if unknown:
        raise ValueError(f"fit() got unknown option(s) {unknown}; expected some of "
                         f"{sorted(_SECTIONS)}")
    for key, value in options.items():
        section, cls = _SECTIONS[key]
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        attr = "name" if key == "optimizer" else key
        hints = typing.get_type_hints(cls)
        setattr(getattr(cfg, section), attr, _coerce(value, hints[attr], f"{section}.{attr}"))
    from ..config import _finalise

    _finalise(cfg)
    return cfg


def fit(
    student: nn.Module, train: Dataset, val: Dataset | None = None, *,
    teacher: nn.Module | None = None, method: str | DistillMethod | None = None,
    weight: float | None = None, method_options: Mapping[str, Any] | None = None,
    levels: list[str] | None = None, student_layers: str | Sequence[str] = "backbone",
    teacher_layers: str | Sequence[str] = "backbone", teacher_root: str = "backbone",
    teacher_dtype: str | None = None, class_names: Sequence[str] | None = None,
    spec: DetectorSpec | None = None, config: Config | None = None,
    callbacks: Sequence[L.Callback] = (), **options: Any,
) -> RunResult:
    """Train ``student`` on ``train`` (and distil ``teacher`` into it when given).

    Args:
        student, teacher: detectors in torchvision's calling convention.
        train, val: datasets of ``(image, target)`` as torchvision's detection references use
            (``target``: ``boxes`` XYXY, ``labels`` 1..K, ``image_id``). Augment inside them.
        method: a method name or alias (default "ssim" with a teacher), a built
            ``DistillMethod``, or "none"; ``weight`` and ``method_options`` are its options.
        class_names: names by label (index 0 = background) for the per-class table; a
            structkd ``CocoDetection`` brings its own.
        spec: the ``DetectorSpec`` the student was built from, if any (then the export can be
            rebuilt without user code).
        config: a ``Config`` whose values the options below override.
        callbacks: extra Lightning callbacks.
        **options: run options by name: trainer (``out_dir``, ``accelerator``, ``devices``,
            ``precision``, ``seed``, ``resume``, ``overwrite``, ...), optimiser (``optimizer``,
            ``lr``, ``momentum``, ``weight_decay``, ``grad_clip``), schedule (``epochs``,
            ``milestones``, ``warmup_iters``, ...) and loader (``batch_size``, ``num_workers``).
    """
    cfg = _apply_options(config or Config(), options)
    if method is None:
        method = "ssim" if teacher is not None else "none"
    if isinstance(method, str):
        cfg.distill.method = method
    cfg.distill.weight = weight if weight is not None else cfg.distill.weight
    if method_options is not None:
        cfg.distill.options = dict(method_options)
    cfg.distill.levels = levels if levels is not None else cfg.distill.levels
    cfg.distill.student_layers, cfg.distill.teacher_layers = student_layers, teacher_layers
    cfg.distill.teacher_root = teacher_root
    cfg.distill.teacher_dtype = teacher_dtype if teacher_dtype is not None else \
        cfg.distill.teacher_dtype
    info = eval_info_for(val, class_names) if val is not None else None
    return run(cfg, student, train, val, teacher=teacher,
               method=method if isinstance(method, DistillMethod) else None,
               eval_info=info, spec=spec, callbacks=callbacks)


def _trainer(cfg: Config, out_dir: Path, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """One trainer for fit and the final validation, so both log into the same CSV/TensorBoard
    files (a second trainer would start them afresh and lose the training curves)."""
    t, s = cfg.trainer, cfg.schedule
    # One rolling file, checkpoints/last.ckpt, rewritten every ``checkpoint_every`` epochs.
    ckpt = SafeCheckpoint(dirpath=out_dir / "checkpoints", filename="last", save_top_k=1,
                          enable_version_counter=False, every_n_epochs=t.checkpoint_every,
                          save_on_train_epoch_end=True)
    csv_log = csv_logger(out_dir)
    loggers = [csv_log, TensorBoardLogger(out_dir, name="tb", version="")]
    trainer = L.Trainer(
        max_epochs=s.epochs, max_steps=s.max_steps or -1, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        gradient_clip_val=cfg.optim.grad_clip, deterministic=t.deterministic,
        # val_every=0: no validation while fitting (the final one still runs).
        check_val_every_n_epoch=t.val_every if t.val_every > 0 else s.epochs + 1,
        log_every_n_steps=t.log_every,
        enable_progress_bar=t.progress, use_distributed_sampler=False, default_root_dir=out_dir,
        num_sanity_val_steps=0, enable_model_summary=False,
        callbacks=[ckpt, DivergenceGuard(factor=t.divergence_factor), *callbacks],
        logger=loggers,
    )
    if trainer.is_global_zero:
        open_csv_logger(csv_log, out_dir)
    return trainer


class _DataModule(L.LightningDataModule):
    """Builds loaders once the strategy knows this process's rank and the world size."""

    def __init__(self, cfg: Config, train: Dataset, val: Dataset | None) -> None:
        super().__init__()
        self.cfg, self.train_ds, self.val_ds = cfg, train, val

    def _replicas(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def train_dataloader(self):
        d = self.cfg.data
        n, rank = self._replicas()
        # Called once the checkpoint (if any) is restored. A checkpoint written at the end of
        # epoch e counts e + 1 epochs processed but only e completed: the loader must start in
        # epoch e + 1 (with workers the first batches are fetched before ``set_epoch`` runs).
        t = self.trainer
        epoch = t.fit_loop.epoch_progress.current.processed if t is not None else 0
        return make_loader(limit(self.train_ds, d.limit_train), batch_size=d.batch_size,
                           num_workers=d.num_workers, shuffle=True, seed=self.cfg.trainer.seed,
                           num_replicas=n, rank=rank, persistent_workers=d.persistent_workers,
                           epoch=epoch)

    def val_dataloader(self):
        d = self.cfg.data
        n, rank = self._replicas()
        if self.val_ds is None:
            return []
        return make_loader(limit(self.val_ds, d.limit_val), batch_size=d.val_batch_size,
                           num_workers=d.num_workers, shuffle=False, seed=0, num_replicas=n,
                           rank=rank, persistent_workers=d.persistent_workers)


def _resume_path(cfg: Config, out_dir: Path) -> Path | None:
    r = cfg.trainer.resume
    if r is None:
        return None
    path = out_dir / "checkpoints" / "last.ckpt" if r == "last" else Path(r).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={r!r}: checkpoint {path} does not exist")
    return path


_IDENTITY_KEYS = ("spec", "class_names", "label_to_cat_id", "method", "levels", "teacher")


def check_resume(path: Path, meta: Mapping[str, Any]) -> None:
    """Refuse to resume ``path`` into a run that is not the same: say what differs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint (loaded with weights_only=True: "
                         f"{type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    saved = ckpt.get("structkd") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a checkpoint of a structkd run (no 'structkd' entry)")
    diffs = []
    for key in _IDENTITY_KEYS:
        a, b = saved.get(key), meta.get(key)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True,
                                                                    default=str):
            diffs.append(f"{key}: checkpoint {json.dumps(a, default=str)[:300]} vs now "
                         f"{json.dumps(b, default=str)[:300]}")
    if diffs:
        raise ValueError(f"cannot resume {path}: it belongs to another run; "
                         + "; ".join(diffs))


def _run_meta(net: Distiller | DetectorLosses, spec: DetectorSpec | None,
              info: EvalInfo | None, cfg: Config) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "structkd_version": __version__,
        "spec": spec.to_dict() if spec is not None else None,
        "class_names": list(info.class_names) if info else [],
        "label_to_cat_id": {str(k): v for k, v in info.label_to_cat_id.items()} if info else {},
        "method": None, "levels": None, "teacher": None,
    }
    if isinstance(net, Distiller):
        meta["method"] = {"name": net.method_name, "weight": net.method.weight,
                          "options": {k: v for k, v in net.options.items()}}
        meta["levels"] = [dataclasses.asdict(p) for p in net.pairs]
        meta["teacher"] = {"fingerprint": weights_fingerprint(net.teacher),
                           "dtype": cfg.distill.teacher_dtype}
    return meta


def run(cfg: Config, student: nn.Module, train: Dataset, val: Dataset | None, *,
        teacher: nn.Module | None = None, method: DistillMethod | None = None,
        eval_info: EvalInfo | None = None, spec: DetectorSpec | None = None,
        callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """The run itself, from a resolved ``Config`` and built objects (``fit`` and the config
    path both end here)."""
    t = cfg.trainer
    if t.threads:
        torch.set_num_threads(t.threads)
    out_dir = prepare_out_dir(t.out_dir, resume=t.resume is not None, overwrite=t.overwrite)
    resume = _resume_path(cfg, out_dir)
    L.seed_everything(t.seed, workers=True, verbose=False)
    d = cfg.distill
    if teacher is not None and (d.method != "none" or method is not None):
        net: Distiller | DetectorLosses = Distiller(
            student, teacher, method if method is not None else d.method,
            student_layers=d.student_layers, teacher_layers=d.teacher_layers,
            teacher_root=d.teacher_root, levels=d.levels, teacher_dtype=d.teacher_dtype,
            **({} if method is not None else d.method_options()),
        )
        logger.info("distillation: %s over levels %s", net.method_name,
                    [p.name for p in net.pairs])
    else:
        net = DetectorLosses(student)
    meta = _run_meta(net, spec, eval_info, cfg)
    if resume is not None:
        check_resume(resume, meta)
    module = DetectionModule(net, optim=cfg.optim, schedule=cfg.schedule, eval_info=eval_info,
                             run_meta=meta)
    data = _DataModule(cfg, train, val)
    trainer = _trainer(cfg, out_dir, callbacks)
    if trainer.is_global_zero:  # written only now: everything above has validated it
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None,
                weights_only=True)
    if val is not None and eval_info is not None and module.metrics_step != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
    metrics = module.last_metrics
    step_time = statistics.median(module.step_times) if module.step_times else None
    student = unwrap(student)  # a compiled or DDP-wrapped student exports its own weights
    result = RunResult(out_dir, metrics, None, step_time, count_parameters(student))
    if trainer.is_global_zero:
        result.export_prefix = out_dir / "student"
        export_meta: dict[str, Any] = {"metrics": {k: v for k, v in metrics.items()
                                                   if k != "per_class"}}
        if eval_info is not None:
            export_meta["class_names"] = list(eval_info.class_names)
            export_meta["label_to_cat_id"] = {str(k): v for k, v in
                                              eval_info.label_to_cat_id.items()}
        export_student(student, spec, result.export_prefix, extra_meta=export_meta)
        summary = {
            "mode": "distill" if isinstance(net, Distiller) else "train",
            "method": meta["method"], "metrics": metrics, "step_time_s": step_time,
            "params": result.params, "steps": trainer.global_step,
            "export": str(result.export_prefix), "out_dir": str(out_dir),
        }
        (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return result
