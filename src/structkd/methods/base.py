"""The base of every distillation method: levels, weight, connectors and the per-level loop.

A method is an ``nn.Module`` built once from the paired levels (name, stride, student and teacher
channels). It owns its trainable parts (1x1 adapters here; generators, context blocks in the
methods that need them), so they are registered, trained with the student and saved in
checkpoints. Each training step it receives one :class:`~structkd.methods.DistillContext` and
returns named, already weighted loss terms that sum to its share of the training loss. Methods
are pure tensor code: they know nothing of detectors or Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from ..checks import check_positive
from .connectors import make_adapters
from .context import DistillContext, Level

__all__ = ["DistillMethod"]


class DistillMethod(nn.Module):
    """Base of every distillation method.

    Subclasses take ``levels`` first and keyword-only options with defaults (the registry reads
    them from the signature: ``structkd methods``, the config and ``build_method`` know them),
    call ``super().__init__(levels, weight=weight, adapter=adapter)``, build any other trainable
    parts, and implement :meth:`level_loss`. The base runs the per-level loop: it adapts each
    student level to the teacher's width (``self.adapters``), calls ``level_loss``, records the
    level's value for the logs and sums the levels.

    ``adapter``: "auto" (a 1x1 convolution only where the widths differ), "conv1x1" (always,
    identity-initialised where they match) or "identity" (none; widths must match).

    Class attributes: ``paper``; ``needs_boxes`` (the context must carry ground-truth boxes);
    ``needs_head`` ("dense": the context carries both heads' predictions, ``student_head`` and
    ``teacher_head``); ``needs_distribution`` (those carry box distributions);
    ``compares_classes`` (the student's class scores are compared with the teacher's class by
    class: the class counts must agree); ``cross_cut`` (an instance's: the context carries
    ``cross_head``, the teacher's head run from that layer on the student's head features,
    each first passed through the method's ``adapt(branch, x)``); ``uses_features``
    (False: a method of head outputs only, built without adapters, whose
    ``level_loss`` gets the levels' features as they are);
    ``presets`` (option values per detector family, for a ``preset`` option) and
    ``preset_strides`` (the strides of the levels the authors distil per family, used when the
    caller does not choose levels).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_boxes: ClassVar[bool] = False
    needs_head: ClassVar[str | None] = None
    needs_distribution: ClassVar[bool] = False
    compares_classes: ClassVar[bool] = False
    cross_cut: int | None = None  # CrossKD: the head layer after which the student's is read
    uses_features: ClassVar[bool] = True
    supports: ClassVar[str] = "every family"  # the detectors it reads, in words
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    preset_strides: ClassVar[Mapping[str, tuple[int, ...]]] = {}

    def __init__(self, levels: Sequence[Level] | Mapping[str, Level], *, weight: float = 1.0,
                 adapter: str = "auto") -> None:
        super().__init__()
        items = list(levels.values()) if isinstance(levels, Mapping) else list(levels)
        if not items:
            raise ValueError("levels is empty; a method needs at least one paired level")
        for lv in items:
            if not isinstance(lv, Level):
                raise ValueError(f"levels must hold Level objects, got {type(lv).__name__}")
        names = [lv.name for lv in items]
        if len(set(names)) != len(names):
            raise ValueError(f"level names {names} are not unique")
        self.levels: dict[str, Level] = {lv.name: lv for lv in items}
        self.weight = check_positive("weight", weight, allow_zero=True)
        self.level_values: dict[str, Tensor] = {}
        self.adapters = make_adapters(
            {n: (lv.student_channels, lv.teacher_channels) for n, lv in self.levels.items()},
            adapter) if self.uses_features else nn.ModuleDict()

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> Tensor | dict[str, Tensor]:
        """The unweighted loss of level ``name``: one scalar, or several named terms.

        ``student`` is the level after its adapter (teacher width, with gradient), ``teacher``
        the teacher's level (detached); ``ctx`` gives the padding geometry
        (``ctx.mean_over_images``), the boxes and the labels.
        """
        raise NotImplementedError

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        """``{"distill": weight * sum over levels}``, or one ``"distill/<term>"`` per term for
        methods whose :meth:`level_loss` returns several. The teacher's maps are detached here,
        for every method: no gradient ever reaches the teacher."""
        self.check_context(ctx)
        ctx = dataclasses.replace(ctx, teacher={k: v.detach() for k, v in ctx.teacher.items()})
        totals: dict[str, Tensor] = {}
        for name in self.levels:
            student = ctx.student[name]
            if name in self.adapters:
                student = self.adapters[name](student)
            terms = self.level_loss(name, student, ctx.teacher[name], ctx)
            if isinstance(terms, Tensor):
                terms = {"": terms}
            values = list(terms.values())
            level = values[0]
            for v in values[1:]:
                level = level + v
            self.level_values[name] = level.detach()
            for key, value in terms.items():
                totals[key] = value if key not in totals else totals[key] + value
        return {("distill" if key == "" else f"distill/{key}"): self.weight * total
                for key, total in totals.items()}

    def check_context(self, ctx: DistillContext) -> None:
        """Raise a clear error when the context lacks a level or boxes the method needs."""
        missing = [n for n in self.levels if n not in ctx.student or n not in ctx.teacher]
        if missing:
            raise ValueError(
                f"levels {missing} are missing from the context; the method was built for "
                f"{list(self.levels)}, got student {list(ctx.student)}, teacher {list(ctx.teacher)}"
            )
        if self.needs_boxes and ctx.boxes is None:
            raise ValueError(f"method {self.name!r} needs ground-truth boxes in the context")
        if self.needs_head:
            heads = (ctx.student_head or {}, ctx.teacher_head or {})
            lacking = [n for n in self.levels if n not in heads[0] or n not in heads[1]]
            if lacking:
                raise ValueError(f"method {self.name!r} needs both heads' predictions at "
                                 f"levels {lacking}; the context has student "
                                 f"{list(heads[0])}, teacher {list(heads[1])}")

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, weight={self.weight:g}"
