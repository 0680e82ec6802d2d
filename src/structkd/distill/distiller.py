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
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..detectors import as_detector, detector_family
from ..methods import DEFAULT_METHOD, DistillContext, DistillMethod
from .pairing import LevelPair
from .taps import FeatureTap
from .teacher import FrozenTeacher, TeacherDtype
from .teacher_cache import TeacherCache
from .wiring import wire

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
            "ssim", "l1", "mse", "pkd", "cwd", "mgd", "fgd", "scoreweighted", "bckd", "ld",
            "crosskd", "detr_kd", ...), several (``["mgd", "bckd"]`` or ``"mgd+bckd"``: their
            options then go per method, ``bckd={"loc_weight": 2.0}``), or a built
            ``DistillMethod``.
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
        method: str | list[str] | DistillMethod = DEFAULT_METHOD, *,
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
        self.auto_weight = weight == "auto"
        self.calibration: Any = None  # what calibrate_weight measured (weight "auto")
        self._probing = False
        self.auto_weight_set = False
        if isinstance(weight, str) and not self.auto_weight:
            raise ValueError(f"weight={weight!r}; expected a number >= 0, 'auto' or None")
        if weight is not None and not self.auto_weight:
            options["weight"] = weight
        self.last_teacher: dict[str, Tensor] = {}  # the teacher's levels of a probing step
        # per level of a probing step: whether the student's map depends on trainable weights
        self.last_student_trainable: dict[str, bool] = {}
        self.teacher_device = None if teacher_device is None else torch.device(teacher_device)
        self.wiring = wire(student, teacher, method, levels=levels,
                           student_layers=student_layers, teacher_layers=teacher_layers,
                           teacher_root=teacher_root, teacher_dtype=teacher_dtype,
                           teacher_device=teacher_device, **options)
        self.student = student
        self.method = self.wiring.method
        self._cache = teacher if isinstance(teacher, TeacherCache) else None

    @property
    def tap(self) -> FeatureTap:
        """The student's tap (its levels and batch of the last forward)."""
        return self.wiring.tap

    @property
    def pairs(self) -> list[LevelPair]:
        """The paired levels being distilled."""
        return self.wiring.pairs

    @property
    def unpaired(self) -> tuple[list[str], list[str]]:
        """The student's and the teacher's levels that found no partner."""
        return self.wiring.unpaired

    @property
    def student_layers(self) -> list[str]:
        return self.wiring.student_layers

    @property
    def method_name(self) -> str:
        return self.wiring.method_name

    @property
    def options(self) -> dict[str, Any]:
        """The method's options as built (its preset included)."""
        return self.wiring.options

    # ---- the teacher, outside the module tree ---------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        """The teacher detector as given (frozen, eval mode)."""
        if self._cache is not None:  # not AttributeError: nn.Module would replace the message
            raise RuntimeError(f"this Distiller reads the teacher's levels from the cache "
                               f"{self._cache.root}; it has no teacher model")
        return self.frozen_teacher.model

    @property
    def teacher_cache(self) -> TeacherCache | None:
        """The teacher cache the levels come from, if any."""
        return self._cache

    @property
    def frozen_teacher(self) -> FrozenTeacher:
        source = self.wiring.teacher
        if not isinstance(source, FrozenTeacher):
            raise RuntimeError("this Distiller reads the teacher's levels from a cache")
        return source

    def teacher_fingerprint(self) -> str:
        """A hash of the teacher's weights (checked when a run resumes; a cache records the
        hash of the teacher it was written from)."""
        return self.wiring.fingerprint()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.wiring.teacher.to(fn)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self._cache is None:
            self.frozen_teacher.model.eval()  # BatchNorm statistics must never drift
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
        return self.wiring.teacher.features(batch, image_sizes, targets)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not self.student.training:
            raise RuntimeError("Distiller.forward computes training losses; call .train() first")
        if self.auto_weight and not self._probing and not self.auto_weight_set:
            raise RuntimeError(
                "weight='auto' is not measured yet: call structkd.distill.calibrate_weight("
                "distiller, batches) before training (structkd.fit does it on the first batches)")
        tap = self.wiring.tap
        tap.clear()
        det_losses = self.student(images, targets)
        s_levels, t_levels, batch, sizes, t_targets = self._tapped(targets)
        student, teacher = self.wiring.paired(s_levels, t_levels)
        boxes = labels = None
        if t_targets is not None:
            boxes = [t["boxes"] for t in t_targets]
            labels = [t["labels"] for t in t_targets]
        if self._probing:
            self.last_teacher = {k: v.detach() for k, v in teacher.items()}
            self.last_student_trainable = {k: v.requires_grad for k, v in student.items()}
        heads = self.wiring.head_outputs(t_levels, batch, sizes)
        ctx = DistillContext(student, teacher, self.method.levels,
                             batch_shape=tuple(batch.shape[-2:]), image_sizes=sizes,
                             boxes=boxes, labels=labels, **heads)
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
        tap = self.wiring.tap
        try:
            tap.clear()
            self.student(images)
            s_levels, t_levels, *_ = self._tapped(None)
        finally:
            tap.clear()
            self.student.train(was_training)
        return ({p.name: s_levels[p.student] for p in self.pairs},
                {p.name: t_levels[p.teacher] for p in self.pairs})

    def _tapped(self, targets: list[dict[str, Tensor]] | None):
        """After a student forward: its tapped levels, the teacher's levels on the student's
        batched input, that batch, its image sizes and the targets in its coordinates."""
        tap = self.wiring.tap
        s_levels = tap.levels()
        if tap.batch_path is not None:
            batch, sizes, t_targets = tap.batch()
        else:
            batch, sizes, t_targets = tap.input()[0], None, targets
        return (s_levels, self.teacher_features(batch, sizes, targets), batch, sizes,
                t_targets)

    def level_values(self) -> dict[str, Tensor]:
        """``level/<name>`` -> the last step's per-level value (detached, unweighted): what the
        logs show per level, kept out of the summable loss dict."""
        return {f"level/{k}": v for k, v in self.method.level_values.items()}

    def close(self) -> None:
        """Remove the hooks from the student, and from the teacher where its tapped layers are
        not its root's output (the Distiller cannot run afterwards)."""
        self.wiring.close()


class DetectorLosses(nn.Module):
    """A detector without a teacher, with the same output as ``Distiller``: its loss dict."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = as_detector(student)

    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        return dict(self.student(images, targets))

    def level_values(self) -> dict[str, Tensor]:
        return {}
