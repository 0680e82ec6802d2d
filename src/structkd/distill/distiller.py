"""One distillation step: student forward + taps -> teacher features -> method -> loss terms.

Data flow::

    images, targets -> student (its own forward: transform -> backbone -> heads -> det losses)
                       |  taps keep the transformed batch, its image sizes and boxes, and the
                       v  student's tapped levels
    batch -> frozen teacher (root only, eval, no grad) -> teacher levels
    levels paired by stride -> DistillContext -> method -> named, weighted loss terms

``Distiller.forward`` returns the student's detection losses and the method's terms in one dict
whose values sum to the training loss, as in torchvision's reference loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..detectors import as_detector, detector_family, family_defaults
from ..methods import DistillContext, DistillMethod, build_method, resolve_method
from .pairing import measure_levels, pair_levels, paired_maps
from .taps import FeatureTap, find_module, unwrap
from .teacher import FrozenTeacher, TeacherDtype, normalisation, weights_fingerprint
from .teacher_cache import TeacherCache

logger = logging.getLogger("structkd.distill")

__all__ = ["DetectorLosses", "Distiller", "detector_family"]  # the last from ..detectors


class Distiller(nn.Module):
    """A student detector trained with a frozen teacher's features as extra targets.

    Args:
        student: a detector in torchvision's calling convention (``student(images, targets)``
            returns a dict of losses in train mode), or a model of a family with an adapter
            (a transformers ``*ForObjectDetection``, ...), wrapped by
            :func:`structkd.detectors.as_detector` (the wrapper is ``self.student``).
        teacher: a detector of any such family; frozen, kept out of ``parameters()`` and
            ``state_dict()``, but moved by ``.to()``. Or a :class:`TeacherCache`: its levels
            written once by ``structkd cache-teacher``, looked up by each target's
            ``image_id`` and ``hflip`` (the teacher is then not needed at all).
        method: a registered method name or alias (``structkd methods`` lists them:
            "ssim", "l1", "mse", "pkd", "cwd", "mgd", "fgd", ...) or a built ``DistillMethod``.
        weight: the method's overall weight (None: the method's default or its preset's;
            "auto": measured before training by :func:`~structkd.distill.calibrate_weight`,
            which ``fit`` calls on the first batches; the Distiller refuses to train until then).
        levels: distil only these paired levels (e.g. ``["s8", "s16"]``); None: the levels the
            method's preset names (PKD: strides 8-64 of RetinaNet-like students), else every
            level the two detectors share.
        student_layers / teacher_layers: module path(s) to tap; None: the family's default
            (``"backbone"``, the backbone + FPN output, for torchvision detectors; the hybrid
            encoder's outputs for RT-DETR-like ones). A list taps one level per module.
        teacher_root: the teacher module that takes the batched images; None: the family's
            (``"backbone"`` for torchvision; the teacher stops once its tapped levels ran).
        teacher_dtype: "bfloat16" runs the teacher in bf16; None follows the trainer's autocast.
        teacher_device: run the teacher on this device (e.g. "cuda:1", beside a student on
            "cuda:0"): the batch goes there and the levels come back; None: the student's.
        **options: the method's other options (``structkd methods`` lists them; checked when
            the method is built, with the valid names in the message).

    ``forward(images, targets)`` returns the student's detection losses and the method's
    weighted terms; ``sum(out.values())`` is the loss to back-propagate. ``level_values()``
    gives the last step's per-level values for logging.

    Example, in your own loop::

        distiller = Distiller(student, teacher, method="ssim", weight=2.0)
        opt = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)
        losses = distiller(images, targets)
        sum(losses.values()).backward(); opt.step()
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module | TeacherCache,
        method: str | DistillMethod = "ssim", *,
        weight: float | Literal["auto"] | None = None, levels: list[str] | None = None,
        student_layers: str | list[str] | None = None,
        teacher_layers: str | list[str] | None = None, teacher_root: str | None = None,
        teacher_dtype: TeacherDtype | torch.dtype | None = None,
        teacher_device: str | None = None, **options: Any,
    ) -> None:
        super().__init__()
        student = as_detector(student)
        if not isinstance(teacher, TeacherCache):
            teacher = as_detector(teacher)
        inner = unwrap(student)
        self._cache = teacher if isinstance(teacher, TeacherCache) else None
        s_root, s_default = family_defaults(student)
        if student_layers is None:
            student_layers = s_default
        if self._cache is None:
            t_root, t_default = family_defaults(teacher)
            teacher_root = t_root if teacher_root is None else teacher_root
            teacher_layers = t_default if teacher_layers is None else teacher_layers
        else:  # the cache's own levels; the names only label them
            teacher_root = teacher_root or "backbone"
            teacher_layers = teacher_layers or teacher_root
        self.last_teacher: dict[str, Tensor] = {}  # the teacher's levels of a probing step
        # per level of a probing step: whether the student's map depends on trainable weights
        self.last_student_trainable: dict[str, bool] = {}
        if self._cache is None and inner is unwrap(teacher):  # also through DDP / compile
            raise ValueError("student and teacher are the same module; pass two detectors")
        self.student = student
        # Only torchvision's transform gives (ImageList, targets); any other ``transform``
        # attribute (a plain callable, a user module) is the model's own business.
        self._has_transform = isinstance(getattr(inner, "transform", None),
                                         GeneralizedRCNNTransform)
        s_layers = [student_layers] if isinstance(student_layers, str) else list(student_layers)
        for name, layers in (("student_layers", s_layers), ("teacher_layers", teacher_layers)):
            if not layers or not all(isinstance(p, str) and p for p in (
                    [layers] if isinstance(layers, str) else layers)):
                raise ValueError(f"{name}={layers!r}; expected a module path (e.g. 'backbone') "
                                 "or a non-empty list of them")
        # The student's batched input: torchvision's transform output, else the input of the
        # family's root, or of the first tapped module's top-level parent.
        if not any(p == s_root or p.startswith(s_root + ".") or not s_root for p in s_layers):
            s_root = s_layers[0].split(".")[0]
        find_module(student, s_root, "student")
        self._tap = FeatureTap(student, s_layers,
                               input_path=None if self._has_transform else s_root,
                               batch_path="transform" if self._has_transform else None)
        self._frozen: list[FrozenTeacher] = []
        self.auto_weight = weight == "auto"
        self.calibration: Any = None  # what calibrate_weight measured (weight "auto")
        self._probing = False
        self.auto_weight_set = False
        if isinstance(weight, str) and not self.auto_weight:
            raise ValueError(f"weight={weight!r}; expected a number >= 0, 'auto' or None")
        if weight is not None and not self.auto_weight:
            options["weight"] = weight
        self.student_layers = s_layers
        self.teacher_device = None if teacher_device is None else torch.device(teacher_device)
        try:
            self._wire(student, teacher, method, s_root=s_root, teacher_layers=teacher_layers,
                       teacher_root=teacher_root, levels=levels, teacher_dtype=teacher_dtype,
                       options=options)
        except BaseException:
            self.close()  # a Distiller that failed to build leaves no hooks behind
            raise

    def _wire(self, student: nn.Module, teacher: nn.Module, method: str | DistillMethod, *,
              s_root: str, teacher_layers: str | Sequence[str], teacher_root: str,
              levels: list[str] | None, teacher_dtype: str | torch.dtype | None,
              options: dict[str, Any]) -> None:
        """Freeze the teacher, measure and pair the levels, build the method."""
        s_levels = measure_levels(student, self._tap, s_root, role="student")
        if isinstance(teacher, TeacherCache):
            t_levels = teacher.levels
        else:
            self._frozen = [FrozenTeacher(teacher, root=teacher_root, layers=teacher_layers,
                                          dtype=teacher_dtype,
                                          student_norm=normalisation(student))]
            if self.teacher_device is not None:
                self._frozen[0].model.to(self.teacher_device)
            t_tap = self._frozen[0].tap_for_dry_run()
            try:
                t_levels = measure_levels(self._frozen[0].model, t_tap, teacher_root,
                                          role="teacher")
            finally:
                if t_tap is not self._frozen[0].tap:
                    t_tap.close()
        pairs = pair_levels(s_levels, t_levels, levels)
        self.unpaired = ([k for k in s_levels if k not in {p.student for p in pairs}],
                         [k for k in t_levels if k not in {p.teacher for p in pairs}])
        self.method_name = method if isinstance(method, str) else method.name
        if isinstance(method, DistillMethod):
            if options:
                raise ValueError("method options are only accepted with a method name")
            self.pairs = [p for p in pairs if p.name in method.levels]
            missing = [n for n in method.levels if n not in {p.name for p in pairs}]
            if missing:
                raise ValueError(f"the method was built for levels {list(method.levels)}, but "
                                 f"the detectors share only {[p.name for p in pairs]}")
            self.method = method
        else:
            cls, _ = resolve_method(method)
            preset = options.get("preset")
            if cls.presets and preset is None:
                preset = options["preset"] = self._preset_for(cls, student)
            if levels is None and preset in cls.preset_strides:
                keep = cls.preset_strides[preset]
                chosen = [p for p in pairs if p.stride in keep]
                if chosen:
                    pairs = chosen
            self.pairs = pairs
            self.method = build_method(method, [p.level for p in self.pairs], **options)
        self.options = dict(options)

    def _preset_for(self, cls: type[DistillMethod], student: nn.Module) -> str:
        family = detector_family(student)
        if family in cls.presets:
            return family
        logger.warning("%s has no preset for %s students; falling back to its retinanet preset "
                       "%s, whose weight was tuned against RetinaNet's losses: with structkd's "
                       "engine set the weight to 'auto' (measured on the first batches) or a "
                       "number of your own (or the method option 'preset' to one of %s)",
                       cls.name, family, dict(cls.presets["retinanet"]), sorted(cls.presets))
        return "retinanet"

    # ---- the teacher, outside the module tree ---------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        """The teacher detector as given (frozen, eval mode)."""
        if self._cache is not None:  # not AttributeError: nn.Module would replace the message
            raise RuntimeError(f"this Distiller reads the teacher's levels from the cache "
                                 f"{self._cache.root}; it has no teacher model")
        return self._frozen[0].model

    @property
    def teacher_cache(self) -> TeacherCache | None:
        """The teacher cache the levels come from, if any."""
        return self._cache

    @property
    def frozen_teacher(self) -> FrozenTeacher:
        return self._frozen[0]

    def teacher_fingerprint(self) -> str:
        """A hash of the teacher's weights (checked when a run resumes; a cache records the
        hash of the teacher it was written from)."""
        if self._cache is not None:
            return self._cache.teacher_fingerprint
        return weights_fingerprint(self.teacher)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for frozen in self._frozen:
            frozen.to(fn)
            if self.teacher_device is not None:  # dtype changes apply, the device stays
                frozen.to(lambda t: t.to(self.teacher_device))
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for frozen in self._frozen:
            frozen.model.eval()  # BatchNorm statistics of the teacher must never drift
        return self

    # ---- the weight ---------------------------------------------------------------------------
    @property
    def weight(self) -> float:
        """The method's overall weight (what multiplies its terms)."""
        return float(self.method.weight)

    def set_weight(self, weight: float) -> None:
        """Set the method's overall weight (a calibrated or adapted one)."""
        if not (isinstance(weight, int | float) and weight >= 0 and weight < float("inf")):
            raise ValueError(f"weight={weight!r}; expected a finite number >= 0")
        self.method.weight = float(weight)
        self.auto_weight_set = True

    @contextlib.contextmanager
    def probing(self, weight: float | None = None) -> Iterator[None]:
        """Steps for measurement only (calibration, start-up checks): allowed before an
        ``"auto"`` weight is set, at ``weight`` if given; the weight is restored after."""
        before, was = self.method.weight, self._probing
        self._probing = True
        if weight is not None:
            self.method.weight = float(weight)
        try:
            yield
        finally:
            self.method.weight, self._probing = before, was

    # ---- one step ---------------------------------------------------------------------------
    def teacher_features(self, batch: Tensor,
                         image_sizes: Sequence[tuple[int, int]] | None = None,
                         targets: Sequence[dict[str, Any]] | None = None) -> dict:
        """The teacher's tapped levels on the student's batched input (from the cache: the
        levels of each target's ``image_id`` and ``hflip`` variant)."""
        if self._cache is None:
            if self.teacher_device is None or self.teacher_device == batch.device:
                return self._frozen[0].features(batch, image_sizes)
            levels = self._frozen[0].features(
                batch.to(self.teacher_device, non_blocking=True), image_sizes)
            return OrderedDict((k, v.to(batch.device, non_blocking=True))
                               for k, v in levels.items())
        cache = self._cache
        if targets is None:
            raise ValueError("levels from a teacher cache are looked up by the targets' "
                             "image_id and hflip; this call has no targets")
        if tuple(batch.shape[-2:]) != cache.batch_shape:
            raise ValueError(f"the teacher cache {cache.root} holds levels of {cache.batch_shape} "
                             f"batches; this batch is {tuple(batch.shape[-2:])}")
        keys = []
        for t in targets:
            if "hflip" not in t and len(cache.variants) > 1:
                raise ValueError("the targets carry no 'hflip' entry, so the cached variant is "
                                 "unknown: use structkd.data.build_transforms for training")
            keys.append((int(t["image_id"]), int(bool(t.get("hflip", False)))))
        return cache.features(keys, device=batch.device, dtype=batch.dtype)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not self.student.training:
            raise RuntimeError("Distiller.forward computes training losses; call .train() first")
        if self.auto_weight and not self._probing and not self.auto_weight_set:
            raise RuntimeError(
                "weight='auto' is not measured yet: call structkd.distill.calibrate_weight("
                "distiller, batches) before training (structkd.fit does it on the first batches)")
        self._tap.clear()
        det_losses = self.student(images, targets)
        s_levels, t_levels, batch, sizes, t_targets = self._tapped(targets)
        student, teacher = paired_maps(self.pairs, s_levels, t_levels)
        boxes = labels = None
        if t_targets is not None:
            boxes = [t["boxes"] for t in t_targets]
            labels = [t["labels"] for t in t_targets]
        if self._probing:
            self.last_teacher = {k: v.detach() for k, v in teacher.items()}
            self.last_student_trainable = {k: v.requires_grad for k, v in student.items()}
        ctx = DistillContext(student, teacher, self.method.levels,
                             batch_shape=tuple(batch.shape[-2:]), image_sizes=sizes,
                             boxes=boxes, labels=labels)
        terms = self.method(ctx)
        clash = set(terms) & set(det_losses)
        if clash:
            raise RuntimeError(f"method terms {sorted(clash)} clash with detection losses")
        return {**det_losses, **terms}

    @torch.no_grad()
    def features(self, images: list[Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The paired levels of student and teacher on ``images``, by pair name, without the
        method's adapters: what the deployed student's features look like next to the
        teacher's (both see the student's batched input; eval mode, no gradient)."""
        was_training = self.student.training
        self.student.eval()
        try:
            self._tap.clear()
            self.student(images)
            s_levels, t_levels, *_ = self._tapped(None)
        finally:
            self._tap.clear()
            self.student.train(was_training)
        return ({p.name: s_levels[p.student] for p in self.pairs},
                {p.name: t_levels[p.teacher] for p in self.pairs})

    def _tapped(self, targets: list[dict[str, Tensor]] | None):
        """After a student forward: its tapped levels, the teacher's levels on the student's
        batched input, that batch, its image sizes and the targets in its coordinates."""
        s_levels = self._tap.levels()
        if self._has_transform:
            batch, sizes, t_targets = self._tap.batch()
        else:
            batch, sizes, t_targets = self._tap.input()[0], None, targets
        return (s_levels, self.teacher_features(batch, sizes, targets), batch, sizes,
                t_targets)

    def level_values(self) -> dict[str, Tensor]:
        """``level/<name>`` -> the last step's per-level value (detached, unweighted): what the
        logs show per level, kept out of the summable loss dict."""
        return {f"level/{k}": v for k, v in self.method.level_values.items()}

    def close(self) -> None:
        """Remove the hooks from the student, and from the teacher where its tapped layers are
        not its root's output (the Distiller cannot run afterwards)."""
        self._tap.close()
        for frozen in self._frozen:
            if frozen.tap is not None:
                frozen.tap.close()


class DetectorLosses(nn.Module):
    """A detector without a teacher, with the same output as ``Distiller``: its loss dict."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = as_detector(student)

    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        return dict(self.student(images, targets))

    def level_values(self) -> dict[str, Tensor]:
        return {}
