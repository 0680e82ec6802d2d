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

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..methods import DistillContext, DistillMethod, build_method, resolve_method
from .pairing import measure_levels, pair_levels
from .taps import FeatureTap, find_module, unwrap
from .teacher import FrozenTeacher, TeacherDtype, normalisation, weights_fingerprint

logger = logging.getLogger("structkd.distill")

__all__ = ["DetectorLosses", "Distiller", "detector_family"]


def detector_family(model: nn.Module) -> str:
    """"retinanet", "fcos" or "fasterrcnn": which of a method's presets fits ``model``."""
    name = type(unwrap(model)).__name__.lower()
    if "fcos" in name:
        return "fcos"
    if "rcnn" in name:
        return "fasterrcnn"
    return "retinanet"


class Distiller(nn.Module):
    """A student detector trained with a frozen teacher's features as extra targets.

    Args:
        student: a detector in torchvision's calling convention (``student(images, targets)``
            returns a dict of losses in train mode).
        teacher: the same kind of detector; frozen, kept out of ``parameters()`` and
            ``state_dict()``, but moved by ``.to()``.
        method: a registered method name or alias (``structkd methods`` lists them:
            "ssim", "l1", "mse", "pkd", "cwd", "mgd", "fgd", ...) or a built ``DistillMethod``.
        weight: the method's overall weight (None: the method's default or its preset's).
        levels: distil only these paired levels (e.g. ``["s8", "s16"]``); None: the levels the
            method's preset names (PKD: strides 8-64 of RetinaNet-like students), else every
            level the two detectors share.
        student_layers / teacher_layers: module path(s) to tap; default ``"backbone"`` (the
            backbone + FPN output of torchvision detectors). A list taps one level per module.
        teacher_root: the teacher module that takes the batched images (``"backbone"``).
        teacher_dtype: "bfloat16" runs the teacher in bf16; None follows the trainer's autocast.
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
        self, student: nn.Module, teacher: nn.Module, method: str | DistillMethod = "ssim", *,
        weight: float | None = None, levels: list[str] | None = None,
        student_layers: str | list[str] = "backbone",
        teacher_layers: str | list[str] = "backbone", teacher_root: str = "backbone",
        teacher_dtype: TeacherDtype | torch.dtype | None = None, **options: Any,
    ) -> None:
        super().__init__()
        inner = unwrap(student)
        if inner is unwrap(teacher):  # also through DDP / torch.compile wrappers
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
        # first tapped module's top-level parent (the root that takes the images).
        s_root = teacher_root if any(p == teacher_root or p.startswith(teacher_root + ".")
                                     for p in s_layers) else s_layers[0].split(".")[0]
        find_module(student, s_root, "student")
        self._tap = FeatureTap(student, s_layers,
                               input_path=None if self._has_transform else s_root,
                               batch_path="transform" if self._has_transform else None)
        self._frozen: list[FrozenTeacher] = []
        if weight is not None:
            options["weight"] = weight
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
        self._frozen = [FrozenTeacher(teacher, root=teacher_root, layers=teacher_layers,
                                      dtype=teacher_dtype, student_norm=normalisation(student))]
        s_levels = measure_levels(student, self._tap, s_root)
        t_tap = self._frozen[0].tap_for_dry_run()
        try:
            t_levels = measure_levels(self._frozen[0].model, t_tap, teacher_root)
        finally:
            if t_tap is not self._frozen[0].tap:
                t_tap.close()
        pairs = pair_levels(s_levels, t_levels, levels)
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
        logger.info("%s has no preset for %s students; using its retinanet preset (set the "
                    "method option 'preset' to choose)", cls.name, family)
        return "retinanet"

    # ---- the teacher, outside the module tree ---------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        """The teacher detector as given (frozen, eval mode)."""
        return self._frozen[0].model

    @property
    def frozen_teacher(self) -> FrozenTeacher:
        return self._frozen[0]

    def teacher_fingerprint(self) -> str:
        """A hash of the teacher's weights (checked when a run resumes)."""
        return weights_fingerprint(self.teacher)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._frozen[0].to(fn)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics of the teacher must never drift
        return self

    # ---- one step ---------------------------------------------------------------------------
    def teacher_features(self, batch: Tensor,
                         image_sizes: Sequence[tuple[int, int]] | None = None) -> dict:
        """The teacher's tapped levels on the student's batched input."""
        return self._frozen[0].features(batch, image_sizes)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not self.student.training:
            raise RuntimeError("Distiller.forward computes training losses; call .train() first")
        self._tap.clear()
        det_losses = self.student(images, targets)
        s_levels, t_levels, batch, sizes, t_targets = self._tapped(targets)
        student, teacher = {}, {}
        for p in self.pairs:
            s, t = s_levels[p.student], t_levels[p.teacher]
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            student[p.name], teacher[p.name] = s, t
        boxes = labels = None
        if t_targets is not None:
            boxes = [t["boxes"] for t in t_targets]
            labels = [t["labels"] for t in t_targets]
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
        return s_levels, self.teacher_features(batch, sizes), batch, sizes, t_targets

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
        self.student = student

    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        return dict(self.student(images, targets))

    def level_values(self) -> dict[str, Tensor]:
        return {}
