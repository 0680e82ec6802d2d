"""The method API: what a distillation method receives, what it returns, and the registry.

A method is an ``nn.Module`` built once from the paired levels (name, stride, student and teacher
channels). It owns its trainable parts (connectors, generators, attention blocks), so they are
registered, trained with the student and saved in checkpoints. Each training step it receives one
:class:`DistillContext` and returns named, already weighted loss terms that sum to its share of
the training loss. Methods are pure tensor code: they know nothing of detectors or Lightning.

Padding: a batch of images of different shapes is padded to one size. The context says which
cells of every level hold image content; :meth:`DistillContext.groups` splits the batch into
images whose valid regions have equal sizes, so a method computes on each image's own region and
the padded area enters neither its loss nor its statistics.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "ALIASES",
    "METHODS",
    "DistillContext",
    "DistillMethod",
    "Group",
    "Level",
    "MethodInfo",
    "build_method",
    "check_choice",
    "check_method_options",
    "check_positive",
    "describe_methods",
    "method_info",
    "register_method",
    "resolve_method",
]


@dataclass(frozen=True)
class Level:
    """A student level paired with a teacher level of the same stride."""

    name: str  # e.g. "s8": the key of the features in the context, of adapters and of logs
    stride: int  # pixels of the batched input per feature cell
    student_channels: int
    teacher_channels: int


@dataclass(frozen=True)
class Group:
    """Images of a batch whose valid regions at one level have the same size."""

    index: list[int]  # positions in the batch, ascending
    height: int  # valid rows of the level for these images
    width: int  # valid columns
    full: bool  # the group is the whole batch and fills the whole map: no copy needed

    def crop(self, x: Tensor) -> Tensor:
        """The group's images and valid region of a (B, ...) map: (len(index), C, h, w)."""
        if self.full:
            return x
        if len(self.index) != x.shape[0]:
            x = x[self.index] if len(self.index) > 1 else x[self.index[0]][None]
        return x[..., : self.height, : self.width]


@dataclass
class DistillContext:
    """Everything a method may use in one training step.

    ``student`` and ``teacher`` map level names to (B, C, H, W) features: the student's as they
    come out of its neck (with gradient), the teacher's detached, both on the same grid.
    ``image_sizes`` are the (height, width) of each image inside the padded batch of shape
    ``batch_shape``; None means every image fills the batch. ``boxes`` (x1, y1, x2, y2) and
    ``labels`` are the ground truth in the same (resized, padded) pixel coordinates; None when the
    caller has none (methods that need them say so).
    """

    student: Mapping[str, Tensor]
    teacher: Mapping[str, Tensor]
    levels: Mapping[str, Level]
    batch_shape: tuple[int, int]
    image_sizes: Sequence[tuple[int, int]] | None = None
    boxes: Sequence[Tensor] | None = None
    labels: Sequence[Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return next(iter(self.teacher.values())).shape[0]

    def valid_cells(self, name: str) -> list[tuple[int, int]]:
        """(rows, columns) of level ``name`` that hold image content, per image.

        A cell is valid when any image pixel falls into it: ``ceil(size / stride)``, clipped to
        the map (convolutions with stride 2 round up in the same way).
        """
        h, w = self.teacher[name].shape[-2:]
        if self.image_sizes is None:
            return [(h, w)] * self.batch_size
        s = self.levels[name].stride
        return [(min(h, math.ceil(ih / s)), min(w, math.ceil(iw / s)))
                for ih, iw in self.image_sizes]

    def groups(self, name: str) -> list[Group]:
        """The batch split into groups of equal valid size at level ``name`` (first seen first)."""
        h, w = self.teacher[name].shape[-2:]
        cells = self.valid_cells(name)
        if all(c == (h, w) for c in cells):
            return [Group(list(range(len(cells))), h, w, True)]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(cells):
            by_size.setdefault(c, []).append(i)
        return [Group(idx, ch, cw, False) for (ch, cw), idx in by_size.items()]

    def valid_mask(self, name: str) -> Tensor:
        """(B, 1, H, W) float mask of the valid cells of level ``name`` (1 inside, 0 padding)."""
        t = self.teacher[name]
        b, _, h, w = t.shape
        mask = torch.zeros(b, 1, h, w, dtype=t.dtype, device=t.device)
        for i, (vh, vw) in enumerate(self.valid_cells(name)):
            mask[i, :, :vh, :vw] = 1
        return mask

    def level_boxes(self, name: str, index: Sequence[int]) -> list[Tensor]:
        """Ground-truth boxes of images ``index`` in cells of level ``name`` (x1, y1, x2, y2)."""
        if self.boxes is None:
            raise ValueError("this method needs ground-truth boxes, but the context has none")
        s = self.levels[name].stride
        return [self.boxes[i].to(torch.float32) / s for i in index]

    def mean_over_images(
        self, name: str, fn: Callable[[Tensor, Tensor, Group], Tensor],
        student: Tensor | None = None,
    ) -> Tensor:
        """Mean over the batch's images of ``fn`` computed on each image's valid region.

        ``fn(s, t, group)`` receives equal-size crops (b, C, h, w) and returns the *mean* of its
        per-image values; groups are weighted by their number of images. ``student`` replaces the
        context's student map (e.g. after an adapter).
        """
        s_map = self.student[name] if student is None else student
        t_map = self.teacher[name]
        total: Tensor | None = None
        b = t_map.shape[0]
        for g in self.groups(name):
            value = fn(g.crop(s_map), g.crop(t_map), g)
            part = value if g.full else value * (len(g.index) / b)
            total = part if total is None else total + part
        assert total is not None
        return total


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float; a ``ValueError`` naming the option unless it is finite and > 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is invalid; expected a finite number {bound}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid; expected one of {list(choices)}")
    return value


class DistillMethod(nn.Module):
    """Base of every distillation method.

    Subclasses take ``levels`` first and keyword-only options with defaults (the registry reads
    them from the signature, so ``structkd methods`` and the config know them), call
    ``super().__init__(levels, weight=weight)``, build their trainable parts, and implement
    ``forward(ctx) -> {term name: weighted loss}``. They set ``self.level_values[name]`` to each
    level's contribution divided by ``weight`` (detached), the route by which per-level values
    reach the logs without entering the loss dict.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_boxes: ClassVar[bool] = False
    # Settings per detector family ("retinanet", "fasterrcnn", ...) for a ``preset`` option.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(self, levels: Sequence[Level] | Mapping[str, Level], *, weight: float = 1.0):
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

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

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

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, weight={self.weight:g}"


# ---- registry ---------------------------------------------------------------------------------
METHODS: dict[str, type[DistillMethod]] = {}
# alias -> (method name, preset options), e.g. "ssim" -> ("imitation", {"distance": "ssim"})
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register_method(
    name: str, *, aliases: Mapping[str, Mapping[str, Any]] | None = None, replace: bool = False,
) -> Callable[[type[DistillMethod]], type[DistillMethod]]:
    """Class decorator: make a ``DistillMethod`` buildable by ``name`` (config, CLI, API).

    ``aliases`` name preset option sets (``{"ssim": {"distance": "ssim"}}``).
    """

    def decorate(cls: type[DistillMethod]) -> type[DistillMethod]:
        if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
            raise TypeError(f"{cls!r} is not a DistillMethod subclass")
        taken = set(METHODS) | set(ALIASES)
        new = {name, *(aliases or {})}
        if not replace and new & taken:
            raise ValueError(f"method name(s) {sorted(new & taken)} are already registered")
        cls.name = name
        METHODS[name] = cls
        for alias, preset in (aliases or {}).items():
            ALIASES[alias] = (name, dict(preset))
        return cls

    return decorate


def resolve_method(name: str) -> tuple[type[DistillMethod], dict[str, Any]]:
    """The class and preset options of a method name or alias."""
    if name in METHODS:
        return METHODS[name], {}
    if name in ALIASES:
        base, preset = ALIASES[name]
        return METHODS[base], dict(preset)
    raise ValueError(
        f"method={name!r} is unknown; expected one of {sorted(METHODS)} or an alias "
        f"{sorted(ALIASES)}"
    )


@dataclass(frozen=True)
class MethodInfo:
    """What ``structkd methods`` prints: name, paper, options with defaults, aliases."""

    name: str
    summary: str
    paper: str
    options: dict[str, Any]
    aliases: dict[str, dict[str, Any]]
    needs_boxes: bool
    extra_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def _signature_options(cls: type) -> tuple[dict[str, Any], bool]:
    """Keyword options of ``cls.__init__`` with defaults, and whether it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters
    options = {}
    var_kw = False
    for i, (n, p) in enumerate(params.items()):
        if i < 2 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY):  # self, levels
            continue
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL:
            options[n] = None if p.default is p.empty else p.default
    return options, var_kw


def method_info(name: str) -> MethodInfo:
    cls, _ = resolve_method(name)
    options, _ = _signature_options(cls)
    doc = inspect.getdoc(cls) or ""
    extra = cls.extra_options() if hasattr(cls, "extra_options") else {}
    return MethodInfo(
        name=cls.name, summary=doc.splitlines()[0] if doc else "", paper=cls.paper,
        options=options, needs_boxes=cls.needs_boxes, extra_options=extra,
        presets={k: dict(v) for k, v in cls.presets.items()},
        aliases={a: p for a, (base, p) in ALIASES.items() if base == cls.name},
    )


def describe_methods() -> list[MethodInfo]:
    """Every registered method, in registration order."""
    return [method_info(n) for n in METHODS]


def build_method(
    name: str, levels: Sequence[Level] | Mapping[str, Level], **options: Any
) -> DistillMethod:
    """Build a registered method (or alias) for ``levels``, checking ``options`` by name.

    Unknown options fail here, at build time, with the list of valid ones; option values are
    checked by the method itself (``ValueError`` naming the option and the value).
    """
    cls, preset = check_method_options(name, options)
    return cls(levels, **{**preset, **options})


def check_method_options(
    name: str, options: Mapping[str, Any]
) -> tuple[type[DistillMethod], dict[str, Any]]:
    """Check a method name and its option names (not values); returns (class, preset)."""
    cls, preset = resolve_method(name)
    allowed, var_kw = _signature_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown and not var_kw:
        raise ValueError(
            f"option(s) {unknown} are not accepted by method {cls.name!r}; expected some of "
            f"{sorted(allowed)}"
        )
    if var_kw and hasattr(cls, "extra_options"):  # e.g. the chosen distance's own options
        extra = cls.extra_options().get({**preset, **options}.get("distance", ""), None)
        if extra is not None:
            bad = sorted(set(unknown) - set(extra))
            if bad:
                raise ValueError(
                    f"option(s) {bad} are not accepted by method {name!r}; expected some of "
                    f"{sorted(set(allowed) | set(extra))}"
                )
    clash = {k: v for k, v in options.items() if k in preset and preset[k] != v}
    if clash:
        raise ValueError(f"method {name!r} fixes {preset}; options {clash} contradict it")
    return cls, preset
