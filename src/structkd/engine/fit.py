"""``fit``: train or distil a detector the user built, on datasets the user made, with Lightning.

    structkd.fit(student, train_ds, val_ds, teacher=teacher, method="ssim", epochs=12, lr=0.01)

The config path (``structkd.recipes.run_config``, the CLI) builds the objects and calls this
function. A run writes into its output directory: ``config.yaml``, ``checkpoints/last.ckpt``
(without the teacher), ``metrics.csv`` and TensorBoard logs, ``student.safetensors`` +
``student.json`` and ``results.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset, Subset

from ..cpu import configure_threads
from ..detectors import as_detector, class_count, protocol_of
from ..distill import DetectorLosses, Distiller, TeacherCache, unwrap
from ..methods import DEFAULT_METHOD, DistillMethod
from ..models import DetectorSpec, count_parameters, export_student
from .first_sample import check_first_sample
from .monitor.distill_start import DistillStart
from .monitor.distill_watch import DistillWatch
from .monitor.neighbours import CpuNeighbours
from .options import Balance, Loader, Optim, Schedule, TrainerOptions
from .runs.results import RunResult, read_history
from .runs.resume import check_resume, data_identity, resume_path, run_meta, run_options
from .runs.run_dir import claim_out_dir
from .training.datamodule import DetectionDataModule
from .training.evalinfo import eval_info_for
from .training.module import DetectionModule
from .training.trainer import build_trainer

logger = logging.getLogger("structkd.engine")

__all__ = ["DISTILLER_OPTIONS", "OPTIONS", "RunSetting", "fit"]


def _distiller_options() -> list[str]:
    """``Distiller``'s keyword options other than the method and its own options."""
    params = inspect.signature(Distiller.__init__).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY]


DISTILLER_OPTIONS = _distiller_options()


def _options() -> dict[str, tuple[str, str]]:
    """``fit``'s keyword option -> (config section, field): the fields of the run's option
    types and the ``Distiller``'s keyword options, each name once (``optimizer`` is
    ``optim.name``)."""
    owners: dict[str, tuple[str, str]] = {}
    groups = [("optim", Optim), ("schedule", Schedule), ("data", Loader),
              ("trainer", TrainerOptions), ("distill", Balance)]
    names = [(s, f.name) for s, cls in groups for f in dataclasses.fields(cls)]
    names += [("distill", n) for n in DISTILLER_OPTIONS]
    for section, name in names:
        key = "optimizer" if (section, name) == ("optim", "name") else name
        if key in owners:
            raise TypeError(f"option {key!r} belongs to {owners[key][0]} and {section}")
        owners[key] = (section, name)
    return owners


OPTIONS = _options()


@dataclass
class RunSetting:
    """What a run is given besides its models and data: the option objects, the
    ``Distiller``'s keyword options (``distill``), the method, what the run folder's
    ``config.yaml`` records and the options beyond the objects that make another run
    (``identity``: ``section.key`` -> value, e.g. the config path's augmentation)."""

    optim: Optim
    schedule: Schedule
    loader: Loader
    trainer: TrainerOptions
    balance: Balance
    distill: dict[str, Any]
    method: str | DistillMethod
    method_options: dict[str, Any]
    record: dict[str, Any]
    identity: dict[str, Any]

    @property
    def method_name(self) -> str:
        return self.method.name if isinstance(self.method, DistillMethod) else self.method


_OBJECTS = {"optim": Optim, "schedule": Schedule, "data": Loader, "trainer": TrainerOptions}


def _setting(objects: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``objects`` (section -> option object; "distill" -> (Balance, Distiller options)) with
    ``fit``'s keyword options set, each checked by its option type."""
    unknown = sorted(k for k in options if k not in OPTIONS)
    if unknown:
        by_section: dict[str, list[str]] = {}
        for key, (section, _) in OPTIONS.items():
            by_section.setdefault(section, []).append(key)
        raise ValueError(f"fit() got unknown option(s) {unknown}; expected some of "
                         + "; ".join(f"{s}: {sorted(v)}" for s, v in by_section.items()))
    changes: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        section, name = OPTIONS[key]
        changes.setdefault(section, {})[name] = os.fspath(value) if isinstance(
            value, os.PathLike) else value
    out = dict(objects)
    balance, distill = out.pop("distill")
    balance_names = {f.name for f in dataclasses.fields(Balance)}
    distill_changes = changes.pop("distill", {})
    changes["balance"] = {k: v for k, v in distill_changes.items() if k in balance_names}
    out["balance"] = balance
    distill = {**distill, **{k: v for k, v in distill_changes.items()
                             if k not in balance_names}}
    for section, values in changes.items():
        if not values:
            continue
        try:
            out[section] = dataclasses.replace(out[section], **values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"fit(): {e}") from None
    out["distill"] = distill
    return out


def fit(
    student: nn.Module, train: Dataset, val: Dataset | None = None, *,
    teacher: nn.Module | TeacherCache | None = None,
    method: str | DistillMethod | None = None,
    method_options: Mapping[str, Any] | None = None,
    optim: Optim | None = None, schedule: Schedule | None = None, loader: Loader | None = None,
    trainer: TrainerOptions | None = None, balance: Balance | None = None,
    class_names: Sequence[str] | None = None, spec: DetectorSpec | None = None,
    callbacks: Sequence[L.Callback] = (), record: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None, **options: Any,
) -> RunResult:
    """Train ``student`` on ``train`` (and distil ``teacher`` into it when given).

    Args:
        student, teacher: detectors in torchvision's calling convention, or models of a family
            with an adapter (transformers ``*ForObjectDetection``, ...; see
            ``structkd.detectors``), in any pairing; ``teacher`` may be a ``TeacherCache``
            (``structkd cache-teacher``): the levels are then read from it by each training
            target's ``image_id`` and ``hflip``.
        train, val: datasets of ``(image, target)`` as torchvision's detection references use
            (``target``: ``boxes`` XYXY, ``labels`` 1..K, ``image_id``). Augment inside them.
        method: a method name or alias, a built ``DistillMethod``, or "none"; default:
            ``DEFAULT_METHOD`` ("ssim") with a teacher and "none" without. A method other than
            "none" needs a teacher. ``method_options``: the method's own options.
        optim, schedule, loader, trainer, balance: the run's option objects
            (:class:`Optim`, :class:`Schedule`, :class:`Loader`, :class:`TrainerOptions`,
            :class:`Balance`); their defaults where not given.
        class_names: names by label (index 0 = background) for the per-class table; a
            structkd ``CocoDetection`` brings its own.
        spec: the ``DetectorSpec`` the student was built from, if any (then the export can be
            rebuilt without user code).
        callbacks: extra Lightning callbacks.
        record: what the run folder's ``config.yaml`` records (the config path gives its
            whole config); default: the option objects as YAML sections.
        identity: options beyond the objects that make another run (``section.key`` ->
            value; the config path's augmentation): refused when a resume changes them.
        **options: by name, the fields of the option objects and the ``Distiller``'s options
            (``structkd.engine.OPTIONS`` lists them all), set on the objects: optimiser
            (``optimizer``, ``lr``, ``momentum``, ``weight_decay``, ``grad_clip``), schedule
            (``epochs``, ``milestones``, ``preset``, ``warmup_iters``, ...), loader
            (``batch_size``, ``num_workers``, ``limit_train``, ...), trainer (``out_dir``,
            ``accelerator``, ``devices``, ``precision``, ``seed``, ``resume``, ``overwrite``,
            ...) and distillation (``weight``, a number or "auto", ``levels``,
            ``student_layers``, ``teacher_layers``, ``teacher_root``, ``teacher_dtype``,
            ``teacher_device``) and its balance and watch (``auto_ratio``, ``auto_batches``,
            ``auto_every``, ``watch_every``, ``watch_stall``, ``watch_band``).

    A distillation run first checks on the first batch that the distillation is on (every tap
    fired, a non-constant teacher, a term whose gradient reaches the student) and stops with
    one error otherwise; ``weight="auto"`` is then measured on the first batches.
    """
    distiller = {n: None for n in DISTILLER_OPTIONS}
    objects = _setting({"optim": optim or Optim(), "schedule": schedule or Schedule(),
                        "data": loader or Loader(), "trainer": trainer or TrainerOptions(),
                        "distill": (balance or Balance(), distiller)}, options)
    chosen = method if method is not None else (
        DEFAULT_METHOD if teacher is not None else "none")
    name = chosen.name if isinstance(chosen, DistillMethod) else chosen
    if name != "none" and teacher is None:
        raise ValueError(f"method={name!r} needs a teacher: pass teacher=... (or method='none' "
                         "to train without distillation)")
    if teacher is not None and name == "none":
        logger.warning("a teacher was given but the method is 'none': training without "
                       "distillation")
    method_options = dict(method_options or {})
    if isinstance(chosen, DistillMethod) and method_options:
        raise ValueError("method_options are only accepted with a method name")
    for role, model in (("student", student), ("teacher", teacher)):
        if model is not None and not isinstance(model, nn.Module | TeacherCache):
            raise TypeError(f"fit({role}={model!r}): expected a detector (an nn.Module), got a "
                            f"{type(model).__name__}; build one first, e.g. "
                            "structkd.detector(name, num_classes) or "
                            "structkd.models.load_detector(path)")
    recorded = copy.deepcopy(dict(record)) if record is not None else {
        "optim": dataclasses.asdict(objects["optim"]),
        "schedule": dataclasses.asdict(objects["schedule"]),
        "data": dataclasses.asdict(objects["data"]),
        "trainer": dataclasses.asdict(objects["trainer"]),
        "distill": {**objects["distill"], **dataclasses.asdict(objects["balance"]),
                    "options": method_options}}
    recorded.setdefault("distill", {})["method"] = name
    setting = RunSetting(objects["optim"], objects["schedule"], objects["data"],
                         objects["trainer"], objects["balance"], objects["distill"], chosen,
                         method_options, recorded, dict(identity or {}))
    student = as_detector(student)
    if isinstance(teacher, nn.Module):
        teacher = as_detector(teacher)
    _check_classes(student, train)
    check_first_sample(train, "train")
    if val is not None:
        check_first_sample(val, "val")
    # Read before any seeding: a dataset's own transforms may draw random numbers.
    info = eval_info_for(val, class_names) if val is not None else None
    L.seed_everything(setting.trainer.seed, workers=True, verbose=False)
    if name == "none" or teacher is None:
        net: Distiller | DetectorLosses = DetectorLosses(student)
    else:  # the method's options reach it here, checked by name and type where it is built
        net = Distiller(student, teacher, chosen,
                        **{k: v for k, v in setting.distill.items() if v is not None},
                        **({} if isinstance(chosen, DistillMethod) else method_options))
        logger.info("distillation: %s over levels %s", net.method_name,
                    [p.name for p in net.pairs])
    return _run(setting, net, train, val, class_names=class_names, spec=spec, info=info,
                callbacks=callbacks)


def _check_classes(student: nn.Module, train: Dataset) -> None:
    """Refuse a student whose class head is not the training data's (labels beyond it would
    crash inside the loss or train nothing; classes beyond the data's would be predicted
    untrained), naming both counts."""
    data = train
    while isinstance(data, Subset):
        data = data.dataset
    want, have = getattr(data, "num_classes", None), class_count(student)
    if isinstance(want, int) and have is not None and want != have:
        raise ValueError(f"the student predicts {have - 1} classes (num_classes={have} with the "
                         f"background), the training data has {want - 1} "
                         f"(num_classes={want}); build the student with num_classes={want}")


def _on_cpu(t: TrainerOptions) -> bool:
    return t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())


def _run(setting: RunSetting, net: Distiller | DetectorLosses, train: Dataset,
         val: Dataset | None, *, class_names: Sequence[str] | None, spec: DetectorSpec | None,
         info, callbacks: Sequence[L.Callback]) -> RunResult:
    start = time.perf_counter()
    t = setting.trainer
    if _on_cpu(t):
        configure_threads(t.threads)
    run_dir = claim_out_dir(t.out_dir, resume=t.resume is not None, overwrite=t.overwrite)
    try:
        return _run_in(run_dir.path, setting, net, train, val, class_names=class_names,
                       spec=spec, info=info, callbacks=callbacks, start=start)
    finally:
        run_dir.release()


def _run_in(out_dir: Path, setting: RunSetting, net: Distiller | DetectorLosses,
            train: Dataset, val: Dataset | None, *, class_names: Sequence[str] | None,
            spec: DetectorSpec | None, info, callbacks: Sequence[L.Callback],
            start: float) -> RunResult:
    t = setting.trainer
    student = net.student
    resume = resume_path(t.resume, out_dir)
    options = {**run_options({"optim": setting.optim, "schedule": setting.schedule,
                              "data": setting.loader, "trainer": t}), **setting.identity}
    meta = run_meta(net, spec, info, setting.distill.get("teacher_dtype"), options,
                    data=data_identity(train))
    resumed = check_resume(resume, meta) if resume is not None else None
    if resumed is not None and resumed.unchecked:
        logger.warning("resuming %s, a checkpoint that does not record %s (an earlier "
                       "structkd's): these cannot be checked to be the same as now",
                       resume, ", ".join(resumed.unchecked))
    if resumed is not None and resumed.changed:
        logger.warning("resuming %s at step %d with changed options, applied from there: %s",
                       resume, resumed.step, "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b)
                                                       in resumed.changed.items()))
    balance = setting.balance
    distilling = isinstance(net, Distiller)
    module = DetectionModule(net, optim=setting.optim, schedule=setting.schedule,
                             eval_info=info, run_meta=meta)
    checks, watch = DistillStart(balance), DistillWatch(balance)
    watchers = [checks, watch] if distilling else []
    if _on_cpu(t):
        watchers.append(CpuNeighbours(torch.get_num_threads()))
    data = DetectionDataModule(train, val, setting.loader, seed=t.seed,
                               class_names=class_names, num_classes=class_count(student))
    trainer = build_trainer(out_dir, t, setting.schedule, setting.optim,
                            [*watchers, *callbacks],
                            resume_step=resumed.step if resumed is not None else None)
    if trainer.is_global_zero:  # written only now: everything above has validated it
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(
            yaml.safe_dump(setting.record, sort_keys=False))
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None,
                weights_only=True)
    if val is not None and info is not None and module.metrics_step != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
    metrics = module.last_metrics
    step_time = statistics.median(module.step_times) if module.step_times else None
    student = unwrap(student)  # a compiled or DDP-wrapped student exports its own weights
    result = RunResult(out_dir, metrics, None, step_time, count_parameters(student),
                       steps=trainer.global_step, method=meta["method"])
    if distilling:
        result.distill = {"weight": net.weight, "calibration": checks.calibration,
                          "start_check": checks.check, "watch": watch.summary}
    if trainer.is_global_zero:
        result.export_prefix = out_dir / "student"
        export_meta: dict[str, Any] = {"metrics": {k: v for k, v in metrics.items()
                                                   if k != "per_class"}}
        if info is not None:
            export_meta["class_names"] = list(info.class_names)
            export_meta["label_to_cat_id"] = {str(k): v for k, v in
                                              info.label_to_cat_id.items()}
        view = protocol_of(student)
        native = view.save_native(out_dir / "student_native")  # as its own library saves it
        if native is not None:
            logger.info("student saved as its family saves it: %s", native)
            export_meta["family"] = {"adapter": view.adapter, "native": native.name,
                                     "rebuild": view.rebuild_name(native),
                                     "num_classes": view.num_classes,
                                     "options": view.options()}
        export_student(student, spec, result.export_prefix, extra_meta=export_meta)
        result.wall_s = time.perf_counter() - start
        result.save()
        result.history = read_history(out_dir / "metrics.csv")
    return result

