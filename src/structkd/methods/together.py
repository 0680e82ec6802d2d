"""Several methods in one distillation, as practitioners combine them (a feature method and a
head method: PP-YOLOE+'s distillation, CrossKD + PKD): ``"mgd+bckd"`` (a name joined by ``+``)
or ``["mgd", "bckd"]``.

Each part keeps its own relative weight (its default, its preset's, or its ``weight`` option),
held in the buffer ``part_weights`` so that checkpoints and resumed runs carry it; the method's
``weight`` multiplies them all (what ``set_weight`` and the watch's adaptation change).
``weight: auto`` sets each part's weight so that its gradient alone pulls on the student as a
single method's ``auto`` would (:func:`structkd.distill.calibrate_weight`), the overall weight
then being 1. Terms are named by part: ``distill/mgd``, ``distill/bckd/cls``, ...
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import DistillMethod
from .context import DistillContext, Level

__all__ = ["SEPARATOR", "Together", "split_names"]

SEPARATOR = "+"


def split_names(method: str | Sequence[str]) -> list[str]:
    """The parts of a method given as ``"a+b"`` or ``["a", "b"]`` (one name: one part)."""
    names = [method] if isinstance(method, str) else list(method)
    parts = [p.strip() for n in names for p in str(n).split(SEPARATOR)]
    if not parts or not all(parts):
        raise ValueError(f"method={method!r}; expected method names joined by '+', e.g. "
                         "'mgd+bckd'")
    return parts


class Together(DistillMethod):
    """Several built methods as one: their terms summed, each at its own weight."""

    name = "together"
    paper = "several methods, each from its paper"
    uses_features = False  # the parts own their adapters

    def __init__(self, parts: Mapping[str, DistillMethod], *, weight: float = 1.0) -> None:
        if len(parts) < 2:
            raise ValueError(f"Together needs two methods or more, got {list(parts)}")
        levels: dict[str, Level] = {}
        for m in parts.values():
            levels.update(m.levels)
        super().__init__(list(levels.values()), weight=weight)
        self.parts = nn.ModuleDict(dict(parts))
        self.register_buffer("part_weights", torch.tensor(
            [float(m.weight) for m in parts.values()], dtype=torch.float64))
        for m in self.parts.values():
            m.weight = 1.0  # its weight lives in part_weights
        # what the context must carry: what any part needs
        self.needs_boxes = any(m.needs_boxes for m in parts.values())  # type: ignore[misc]
        heads = {m.needs_head for m in parts.values()} - {None}
        self.needs_head = next(iter(heads), None)  # type: ignore[misc]
        self.needs_distribution = any(  # type: ignore[misc]
            m.needs_distribution for m in parts.values())

    def members(self) -> Iterator[tuple[str, DistillMethod]]:
        yield from self.parts.items()  # type: ignore[misc]

    def part_weight(self, name: str) -> float:
        return float(self.part_weights[list(self.parts).index(name)])

    def set_part_weight(self, name: str, weight: float) -> None:
        with torch.no_grad():
            self.part_weights[list(self.parts).index(name)] = float(weight)

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        self.level_values = {}
        for i, (name, method) in enumerate(self.parts.items()):
            w = self.weight * float(self.part_weights[i])
            if w == 0:
                continue  # a muted part (a calibration probing another) computes nothing
            for key, value in method(ctx).items():
                out[f"distill/{name}{key.removeprefix('distill')}"] = w * value
            for level, value in method.level_values.items():
                self.level_values[f"{name}/{level}"] = value
        if not out:  # every part muted: a zero the caller can still add and back-propagate
            ref = next(iter(ctx.student.values()))
            out["distill"] = ref.sum() * 0.0
        return out

    def extra_repr(self) -> str:
        weights = {n: self.part_weight(n) for n in self.parts}
        return f"weight={self.weight:g}, part_weights={weights}"
