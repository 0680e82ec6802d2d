"""structkd's distillation inside Ultralytics' own training loop.

For users who keep Ultralytics' recipe (augmentation, EMA, schedules, checkpoints)::

    from ultralytics import YOLO
    from structkd.integrations.ultralytics import distill_trainer

    YOLO("yolo26n.yaml").train(data="data.yaml", epochs=100,
                               trainer=distill_trainer("yolo11s.pt", "mgd"))

(A teacher given as a path is read without running code from it; ``YOLO(path)`` is
Ultralytics' own, unrestricted unpickler.)

:func:`distill_trainer` returns a subclass of Ultralytics' ``DetectionTrainer``. Each step:

* the student's Detect-head inputs (or ``student_layers``) are tapped by a
  :class:`~structkd.distill.taps.FeatureTap` during Ultralytics' own forward;
* the teacher (any detector structkd wraps: a YOLO of any generation, an Ultralytics RT-DETR, a
  torchvision or transformers detector) runs frozen, in eval mode, on the same batch tensor
  (``batch["img"]``, pixels in [0, 1]; re-normalised for teachers that normalise, e.g. ImageNet
  mean/std for torchvision) through :class:`~structkd.distill.teacher.FrozenTeacher`, stopping
  after its tapped layers;
* levels are measured and paired by stride (the run is refused when none pair), and the
  method's loss joins Ultralytics' loss as one more term, shown as a ``distill`` column in the
  progress bar and ``results.csv`` (``val/distill`` is 0: validation runs the plain student).

Loss scale: Ultralytics' detection loss is its per-image-mean terms multiplied by the batch
size. structkd's methods return per-image means, and their default weights are set against
per-image-mean detection losses (torchvision's convention, structkd's engine), so the method's
term is multiplied by the batch size too: the ratio of distillation to detection loss is the one
structkd's engine uses for torchvision students (the ``distill`` column shows the per-image
value, like Ultralytics' own columns).

What is saved: ``last.pt`` / ``best.pt`` hold the student alone (Ultralytics' EMA), loadable by
plain ``ultralytics.YOLO(path)`` without structkd: the taps and the distillation criterion are
placed on the live student only after the EMA copied it, and stripped from any later copy before
saving. The method's trainable parts (connectors, MGD generators, FGD blocks) are trained in
their own optimiser parameter groups (``distill``, ``distill_no_decay``) and saved separately, in
``<run>/distill_state.pt``, with what makes the distillation this run's (the teacher's weights
fingerprint, the method's name, weight and options, the paired levels) and the epoch;
``<run>/distill.json`` records the configuration and the paired levels. ``resume=True`` refuses
a trainer whose teacher or method is not the run's, naming both, and a state file of another
epoch than ``last.pt``'s, before Ultralytics restores the optimiser; then it restores the
method's parts.

Limits: one device (no multi-GPU DDP: Ultralytics re-imports the trainer class in its worker
processes); ``compile`` is turned off; the method's parameters are not in Ultralytics' gradient
clipping (it clips the student's). Ultralytics' built-in distillation (``distill_model=``) is
refused with this trainer: one distillation at a time.

Nothing here imports ultralytics at import time (an optional, AGPL-3.0 dependency).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..detectors import as_detector, remove_hooks
from ..detectors.ultralytics import import_ultralytics, is_ultralytics_detector
from ..detectors.ultralytics_build import load_checkpoint
from ..distill.pairing import LevelPair
from ..distill.taps import FeatureTap, find_module
from ..distill.teacher import FrozenTeacher, TeacherDtype
from ..distill.wiring import wire
from ..methods import DEFAULT_METHOD, DistillContext, DistillMethod, check_method

__all__ = ["DISTILL_KEY", "DistillCriterion", "DistillSpec", "UltralyticsDistillation",
           "distill_trainer", "load_teacher", "strip_structkd"]

logger = logging.getLogger("structkd.integrations")

DISTILL_KEY = "distill"  # the loss item / progress column
STATE_FILE = "distill_state.pt"  # the method's trainable parts, beside the run's weights/
CONFIG_FILE = "distill.json"
# Ultralytics' batches hold pixels in [0, 1] with no normalisation.
STUDENT_NORM = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


@dataclass(eq=False)
class DistillSpec:
    """What :func:`distill_trainer` was given: the wrapped teacher, the method and its options."""

    teacher: nn.Module
    method: str
    weight: float | None = None
    levels: list[str] | None = None
    student_layers: str | list[str] | None = None
    teacher_layers: str | list[str] | None = None
    teacher_root: str | None = None
    teacher_dtype: TeacherDtype | None = None
    options: dict[str, Any] = field(default_factory=dict)
    teacher_source: str = ""
    trust_checkpoint: bool = False


def load_teacher(teacher: nn.Module | str | os.PathLike, *,
                 trust_checkpoint: bool = False) -> nn.Module:
    """The teacher as a structkd detector: a model object (YOLO/RT-DETR, torchvision,
    transformers) is wrapped; a path is an Ultralytics ``.pt`` (read without running code from
    it unless ``trust_checkpoint``: :func:`structkd.detectors.ultralytics_build.load_checkpoint`)
    or a structkd export prefix / run ``.ckpt`` (read by :func:`structkd.models.load_detector`)."""
    if isinstance(teacher, str | os.PathLike):
        path = Path(teacher).expanduser()
        if path.suffix == ".pt":
            if not path.is_file():
                raise FileNotFoundError(f"teacher {path} does not exist (structkd never "
                                        "downloads weights)")
            model, _ = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
            if not is_ultralytics_detector(model):
                raise ValueError(f"{path} holds a {type(model).__name__}; expected an "
                                 "Ultralytics detection model")
            model = model.float()
        else:
            from ..models import load_detector

            model, _ = load_detector(path)
    else:
        model = teacher
    if not isinstance(model, nn.Module):
        raise TypeError(f"teacher is a {type(teacher).__name__}; expected a detector (an nn.Module "
                        "or an Ultralytics YOLO/RTDETR object) or a path to one")
    return as_detector(model)


def strip_structkd(model: nn.Module) -> int:
    """Remove structkd's hooks and distillation criterion from ``model`` (e.g. a deep copy of a
    tapped student: Ultralytics' EMA), so that pickling it needs no structkd. Returns the number
    of hooks removed."""
    removed = remove_hooks(model)
    if isinstance(getattr(model, "criterion", None), DistillCriterion):
        model.criterion = None
    return removed


def _student_path(wrapper: nn.Module, path: str) -> str:
    """A student layer path relative to structkd's wrapper (``model.model.16``, as the
    ``Distiller`` takes it) or to the Ultralytics ``DetectionModel`` (``model.16``)."""
    try:
        find_module(wrapper, path, "student")
        return path
    except ValueError as error:
        try:
            find_module(wrapper, f"model.{path}", "student")
        except ValueError:
            raise error from None
        return f"model.{path}"


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class UltralyticsDistillation:
    """The structkd side of a distilled Ultralytics run, built once the student exists.

    ``student`` is the trainer's ``DetectionModel`` (not owned: never copied or saved here). The
    constructor freezes the teacher, measures and pairs the levels and builds the method on
    ``device`` (its random initialisation does not touch the global random stream, so runs with
    and without distillation see the same data order and augmentation). :meth:`attach` taps
    the student and wraps its criterion; :meth:`detach` undoes both.
    """

    def __init__(self, student: nn.Module, spec: DistillSpec, device: torch.device) -> None:
        self.student = student
        self.spec = spec
        self.wrapper = as_detector(student)
        layers = None if spec.student_layers is None else [
            _student_path(self.wrapper, p) for p in _as_list(spec.student_layers)]
        options = dict(spec.options)
        if spec.weight is not None:
            options["weight"] = spec.weight
        try:
            self.wiring = wire(self.wrapper, spec.teacher, spec.method, levels=spec.levels,
                               student_layers=layers, teacher_layers=spec.teacher_layers,
                               teacher_root=spec.teacher_root, teacher_dtype=spec.teacher_dtype,
                               teacher_device=device, student_norm=STUDENT_NORM,
                               record_batch=False, isolate_rng=True, **options)
        except ValueError as e:
            if "stride" not in str(e):
                raise
            raise ValueError(f"cannot distil {spec.teacher_source or type(spec.teacher).__name__}"
                             f" into this student: {e}. Tap other layers (student_layers / "
                             "teacher_layers) so that some strides match") from None
        self.wiring.tap.close()  # tapped again by attach(), after Ultralytics' EMA copy
        self.pairs: list[LevelPair] = self.wiring.pairs
        self.method: DistillMethod = self.wiring.method
        self.options = self.wiring.options
        self.student_layers = self.wiring.student_layers
        self.teacher_root = getattr(self.wiring.teacher, "root", None)
        self.tap: FeatureTap | None = None
        # What makes this distillation the run's own (saved with it, compared on resume);
        # JSON-plain, as it is stored and compared.
        self.identity: dict[str, Any] = json.loads(json.dumps({
            "teacher": self.wiring.fingerprint(),
            "method": {"name": spec.method, "weight": float(self.method.weight),
                       "options": {k: v for k, v in self.options.items() if k != "weight"}},
            "pairs": [p.name for p in self.pairs]}, default=str))

    @property
    def frozen(self) -> FrozenTeacher:
        """The frozen teacher (the teacher source of this run)."""
        return self.wiring.teacher  # type: ignore[return-value]

    # ---- wiring -------------------------------------------------------------------------
    def attach(self) -> None:
        """Tap the student and wrap its criterion (after Ultralytics' EMA copied it)."""
        self.tap = self.wiring.retap(self.wrapper)
        criterion = getattr(self.student, "criterion", None)
        if isinstance(criterion, DistillCriterion):
            criterion = criterion.inner
        if criterion is None:
            criterion = self.student.init_criterion()
        self.student.criterion = DistillCriterion(criterion, self)

    def detach(self) -> None:
        """Remove the taps and restore the student's own criterion."""
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        criterion = getattr(self.student, "criterion", None)
        if isinstance(criterion, DistillCriterion):
            self.student.criterion = criterion.inner

    def parameters(self) -> list[nn.Parameter]:
        """The method's trainable parameters (connectors, generators, ...)."""
        return [p for p in self.method.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        """The method's trainable parts and :attr:`identity` (teacher fingerprint, method,
        pairs)."""
        return {"method": self.method.state_dict(), "identity": self.identity}

    def check_state(self, state: dict[str, Any], source: str) -> None:
        """Refuse a saved state of another distillation than this one (another teacher, method
        or paired levels), naming each difference with both values. A state of an earlier
        structkd records the method's name and the pairs only: those are compared, and a
        warning names what cannot be."""
        saved = state.get("identity")
        now = self.identity
        if not isinstance(saved, dict):  # before the identity was saved
            saved = {"method": {"name": state.get("method_name")}, "pairs": state.get("pairs")}
            now = {**now, "method": {"name": now["method"]["name"]}}
            logger.warning("%s does not record the teacher's fingerprint nor the method's "
                           "weight and options (an earlier structkd's): only the method's name "
                           "and the paired levels are checked", source)
        diffs = [f"{key}: saved {_json(saved.get(key))} vs now {_json(now.get(key))}"
                 for key in ("teacher", "method", "pairs")
                 if key in saved and _json(saved.get(key)) != _json(now.get(key))]
        if diffs:
            raise ValueError(f"cannot resume with {source}: it was saved by another "
                             "distillation; " + "; ".join(diffs))

    def load_state_dict(self, state: dict[str, Any], source: str = "the saved state") -> None:
        """Restore the method's parts from ``state`` once :meth:`check_state` accepts it."""
        self.check_state(state, source)
        self.method.load_state_dict(state["method"])

    def describe(self) -> dict[str, Any]:
        """The configuration and the paired levels, for ``distill.json`` and the log."""
        return {"method": self.spec.method, "weight": float(self.method.weight),
                "options": {k: v for k, v in self.options.items()
                            if isinstance(v, str | int | float | bool | None)},
                "teacher": self.spec.teacher_source or type(self.frozen.model).__name__,
                "teacher_fingerprint": self.identity["teacher"],
                "teacher_root": self.teacher_root, "student_layers": self.student_layers,
                "loss_scale": "method term x batch size (Ultralytics sums its loss over the batch)",
                "pairs": [{"name": p.name, "stride": p.stride, "student": p.student,
                           "teacher": p.teacher, "student_channels": p.student_channels,
                           "teacher_channels": p.teacher_channels} for p in self.pairs]}

    # ---- one step -----------------------------------------------------------------------
    def term(self, batch: dict[str, Any]) -> Tensor:
        """The method's weighted loss (a per-image mean) for the batch whose student forward
        just ran: student levels from the tap, teacher levels on ``batch["img"]``."""
        assert self.tap is not None, "attach() first"
        x: Tensor = batch["img"]
        shape = (int(x.shape[-2]), int(x.shape[-1]))
        try:
            s_levels = self.tap.levels()
            t_levels = self.wiring.teacher.features(x)
            heads = self.wiring.head_outputs(t_levels, x, None)  # before the tap is cleared
        finally:
            self.tap.clear()
        student, teacher = self.wiring.paired(s_levels, t_levels)
        boxes, labels = ground_truth(batch)
        ctx = DistillContext(student, teacher, self.method.levels, batch_shape=shape,
                             image_sizes=None, boxes=boxes, labels=labels, **heads)
        terms = self.method(ctx)
        total = x.new_zeros(())
        for value in terms.values():
            total = total + value.float()
        return total


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def ground_truth(batch: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """Per image, XYXY boxes in the batch tensor's pixels and labels 1..K (structkd's
    convention) from Ultralytics' ``bboxes`` (normalised cx, cy, w, h), ``cls``, ``batch_idx``."""
    x: Tensor = batch["img"]
    n, (height, width) = x.shape[0], x.shape[-2:]
    boxes = batch["bboxes"].to(x.device, torch.float32).reshape(-1, 4)
    scale = boxes.new_tensor([width, height, width, height])
    cx, cy, w, h = (boxes * scale).unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    cls = batch["cls"].to(x.device).reshape(-1).long() + 1
    index = batch["batch_idx"].to(x.device).reshape(-1).long()
    return [xyxy[index == i] for i in range(n)], [cls[index == i] for i in range(n)]


class DistillCriterion:
    """The student's Ultralytics criterion plus the distillation term.

    Returns Ultralytics' ``(loss, items)`` with one more loss entry (the method's term times the
    batch size) and one more item, ``distill`` (the per-image value). Outside training mode
    the term is 0. Attribute reads (``update``, ``hyp``, ...) go to the wrapped criterion, and a
    copy or pickle of this object is a copy of the wrapped criterion alone.
    """

    def __init__(self, inner: Any, distillation: UltralyticsDistillation) -> None:
        self.inner = inner
        self.distillation = distillation

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[Tensor, Any]:
        loss, items = self.inner(preds, batch)
        d = self.distillation
        if d.student.training and d.tap is not None:
            term = d.term(batch)
        else:
            term = batch["img"].new_zeros((), dtype=torch.float32)
        n = batch["img"].shape[0]
        total = torch.cat([loss.reshape(-1), (term * n).reshape(1).to(loss.dtype)])
        if isinstance(items, dict):
            items = {**items, DISTILL_KEY: term.detach()}
        else:  # older Ultralytics: a tensor of items
            items = torch.cat([items.reshape(-1), term.detach().reshape(1).to(items.dtype)])
        return total, items

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.inner.__reduce_ex__(protocol)  # copies and pickles hold the plain criterion


@contextlib.contextmanager
def restricted_loads(trust_checkpoint: bool = False) -> Iterator[None]:
    """Ultralytics' own checkpoint loads (``resume=``, NaN recovery, the final validation)
    restricted to its allowlist for a while, as ``ULTRALYTICS_SAFE_LOAD=1`` makes them;
    unchanged with ``trust_checkpoint=True``."""
    from ultralytics.nn import tasks

    before = getattr(tasks, "SAFE_LOAD", None)
    if before is None or trust_checkpoint:
        yield
        return
    tasks.SAFE_LOAD = True
    try:
        yield
    finally:
        tasks.SAFE_LOAD = before


class _DistillTrainerMixin:
    """The overrides that :func:`distill_trainer` puts in front of ``DetectionTrainer``."""

    distill_spec: ClassVar[DistillSpec]
    distillation: UltralyticsDistillation | None

    def __init__(self, cfg: Any = None, overrides: dict[str, Any] | None = None,
                 _callbacks: Any = None) -> None:
        from ultralytics.utils import DEFAULT_CFG, LOGGER

        overrides = dict(overrides or {})
        if overrides.get("distill_model") is not None:
            raise ValueError("distill_model= starts Ultralytics' own distillation; this trainer "
                             "distils with structkd: use one or the other")
        resume = overrides.get("resume")
        if isinstance(resume, str | Path) and Path(resume).is_file() and \
                not self.distill_spec.trust_checkpoint:
            load_checkpoint(resume)  # refused here, naming what it would import, if unsafe
        with restricted_loads(self.distill_spec.trust_checkpoint):
            super().__init__(DEFAULT_CFG if cfg is None else cfg, overrides, _callbacks)
        args = self.args
        if getattr(args, "distill_model", None) is not None:
            raise ValueError(f"distill_model={args.distill_model!r} (from the configuration) "
                             "starts Ultralytics' own distillation; unset it with this trainer")
        if self.world_size > 1:
            raise ValueError(f"device={args.device!r}: structkd's Ultralytics trainer runs on one "
                             "device (Ultralytics' multi-GPU workers cannot re-create it)")
        if args.compile:
            LOGGER.warning("structkd: 'compile' is not supported with distillation; disabled")
            args.compile = False
        self.distillation = None

    def _build_distillation(self) -> UltralyticsDistillation:
        from ultralytics.utils import LOGGER
        from ultralytics.utils.torch_utils import unwrap_model

        distillation = UltralyticsDistillation(unwrap_model(self.model), self.distill_spec,
                                               self.device)
        info = distillation.describe()
        pairs = ", ".join(f"{p['name']} ({p['student_channels']}->{p['teacher_channels']} ch)"
                          for p in info["pairs"])
        LOGGER.info(f"structkd: {info['method']} (weight {info['weight']:g}) from "
                    f"{info['teacher']} on {pairs}")
        return distillation

    def build_optimizer(self, model: nn.Module, name: str = "auto", lr: float = 0.001,
                        momentum: float = 0.9, decay: float = 1e-5,
                        iterations: float = 1e5) -> torch.optim.Optimizer:
        """Ultralytics' optimiser for the student, plus groups for the method's parameters
        (its learning rate, momentum and schedule; weight decay on weights, not biases)."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        if self.distillation is None:
            self.distillation = self._build_distillation()
        params = self.distillation.parameters()
        ref = next((g for g in optimizer.param_groups if g.get("param_group") == "weight"),
                   optimizer.param_groups[0])
        base = {k: v for k, v in ref.items()
                if k not in ("params", "lr", "initial_lr", "weight_decay", "param_group")}
        if "use_muon" in base:
            base["use_muon"] = False  # MuSGD: plain SGD for the method's parts
        for group, chosen, wd in (("distill", [p for p in params if p.ndim > 1], decay),
                                  ("distill_no_decay", [p for p in params if p.ndim <= 1], 0.0)):
            if chosen:
                optimizer.add_param_group({**base, "params": chosen, "lr": self.args.lr0,
                                           "weight_decay": wd, "param_group": group})
        return optimizer

    def resume_training(self, ckpt: dict[str, Any] | None) -> None:
        """Before Ultralytics restores the optimiser (whose ``distill`` groups are the
        method's): restore the method's parts, refusing a run saved by another distillation or
        a state file of another epoch than the checkpoint's."""
        if ckpt is not None and self.resume:
            self._resume_distillation(ckpt)
        super().resume_training(ckpt)

    def _resume_distillation(self, ckpt: dict[str, Any]) -> None:
        if self.distillation is None:
            raise RuntimeError("build_optimizer did not run: the distillation has no optimiser")
        path = Path(self.save_dir) / STATE_FILE
        if not path.is_file():
            logger.warning("resuming without %s: the method's trainable parts restart from "
                           "their initialisation, and the teacher and method cannot be checked "
                           "to be the run's", path)
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.distillation.load_state_dict(state, str(path))  # refuses another distillation
        epoch, saved_epoch = ckpt.get("epoch"), state.get("epoch")
        if saved_epoch is not None and saved_epoch != epoch:
            raise ValueError(f"cannot resume with {path}: it holds the method's parts of epoch "
                             f"{saved_epoch}, the checkpoint {self.args.resume} is of epoch "
                             f"{epoch} (interrupted between the two saves?); delete it to "
                             "restart the method's parts from their initialisation")

    def _setup_train(self) -> None:
        super()._setup_train()
        if self.distillation is None:
            raise RuntimeError("build_optimizer did not run: the distillation has no optimiser")
        self.distillation.attach()  # after the EMA copied the plain student
        (Path(self.save_dir) / CONFIG_FILE).write_text(
            json.dumps(self.distillation.describe(), indent=2), encoding="utf-8")

    def save_model(self) -> bool:
        if self.ema is not None:
            strip_structkd(self.ema.ema)  # an EMA re-made from the live student (NaN recovery)
        saved = super().save_model()
        if saved and self.distillation is not None:
            torch.save({**self.distillation.state_dict(), "epoch": self.epoch},
                       Path(self.save_dir) / STATE_FILE)
        return saved

    def train(self) -> None:
        try:
            with restricted_loads(self.distill_spec.trust_checkpoint):
                super().train()
        finally:
            if self.distillation is not None:
                self.distillation.detach()


def distill_trainer(teacher: nn.Module | str | os.PathLike, method: str = DEFAULT_METHOD, *,
                    weight: float | None = None, levels: list[str] | None = None,
                    student_layers: str | list[str] | None = None,
                    teacher_layers: str | list[str] | None = None,
                    teacher_root: str | None = None, teacher_dtype: TeacherDtype | None = None,
                    trust_checkpoint: bool = False, **method_options: Any) -> type:
    """A ``DetectionTrainer`` subclass that distils ``teacher`` into the student with ``method``.

    Pass it as ``model.train(..., trainer=distill_trainer(teacher, "mgd"))``.

    Args:
        teacher: a detector structkd wraps (``YOLO``/``RTDETR`` object or its model of any
            generation, a torchvision or transformers detector) or a path: an Ultralytics
            ``.pt``, a structkd export prefix or run ``.ckpt``. Frozen, in eval mode, and
            moved to the trainer's device when training starts.
        method: a structkd method name (``structkd methods``: "ssim", "cwd", "mgd", "fgd", ...).
        weight: the method's weight (None: its default, or its preset's).
        levels: distil only these paired levels (e.g. ``["s8", "s16"]``).
        student_layers: the tapped student layers; default the Detect head's inputs. Paths
            relative to the ``DetectionModel`` (``"model.16"``) or to structkd's wrapper
            (``"model.model.16"``).
        teacher_layers, teacher_root: as for :class:`~structkd.distill.Distiller` (relative to
            the wrapped teacher; default its family's).
        teacher_dtype: run the teacher in this dtype (None follows Ultralytics' autocast).
        trust_checkpoint: a teacher ``.pt`` is read with ``weights_only=True`` against
            Ultralytics' allowlist of model classes, and refused when its pickle names anything
            else; True loads it with Ultralytics' unrestricted unpickler (any code in it runs:
            only for files you vouch for). Pass the path rather than ``YOLO(path)``:
            ``ultralytics.YOLO`` itself unpickles without restriction.
        **method_options: the method's other options (checked here).
    """
    if not isinstance(method, str):
        raise TypeError(f"method is a {type(method).__name__}; give a method name (it is built "
                        "for the paired levels once the student exists)")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)
                               or not 0 <= weight < float("inf")):
        raise ValueError(f"weight={weight!r}; expected a finite number >= 0 or None ('auto' is "
                         "not supported in Ultralytics' loop)")
    check_method(method, {**method_options, **({} if weight is None else {"weight": weight})})
    source = str(teacher) if isinstance(teacher, str | os.PathLike) else type(
        getattr(teacher, "model", teacher)).__name__
    spec = DistillSpec(load_teacher(teacher, trust_checkpoint=trust_checkpoint), method,
                       weight=weight,
                       levels=None if levels is None else list(levels),
                       student_layers=student_layers, teacher_layers=teacher_layers,
                       teacher_root=teacher_root, teacher_dtype=teacher_dtype,
                       options=dict(method_options), teacher_source=source,
                       trust_checkpoint=trust_checkpoint)
    import_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    return type("StructKDDetectionTrainer", (_DistillTrainerMixin, DetectionTrainer),
                {"distill_spec": spec, "__module__": __name__,
                 "__doc__": f"Ultralytics' DetectionTrainer with structkd's {method!r} "
                            f"distillation from {source}."})
