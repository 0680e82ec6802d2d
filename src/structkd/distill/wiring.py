"""One distillation's wiring, built once, used by whoever drives the steps: the ``Distiller``
(and structkd's engine through it) and the Ultralytics integration.

:func:`wire` taps the student, turns the teacher into a :class:`TeacherSource` (a frozen live
teacher, or the levels a teacher cache holds), measures and pairs the levels by stride, picks
the method's preset for the student's family and builds the method. A driver then runs the
student's own forward, reads the tapped levels, asks the teacher source for its levels on the
same batch and gives both to the method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..detectors import detector_family, family_defaults, protocol_of
from ..methods import (
    DEFAULT_METHOD,
    DistillMethod,
    HeadLevel,
    QueryLayer,
    build_method,
    resolve_method,
)
from ..methods.together import SEPARATOR, Together, split_names
from .pairing import LevelInfo, LevelPair, measure_levels, pair_levels, paired_maps
from .taps import FeatureTap, find_module, unwrap
from .teacher import FrozenTeacher, TeacherDtype
from .teacher_cache import TeacherCache

logger = logging.getLogger("structkd.distill")

__all__ = ["CachedTeacher", "TeacherSource", "Wiring", "choose_preset", "teacher_source", "wire"]


class TeacherSource(Protocol):
    """Where a distillation's teacher levels come from: a frozen live teacher
    (:class:`~structkd.distill.teacher.FrozenTeacher`) or a cache (:class:`CachedTeacher`)."""

    def measure(self) -> OrderedDict[str, LevelInfo]:
        """Each level's stride and width (a dry run, or what the cache recorded)."""

    def features(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]] | None = None,
                 targets: Sequence[dict[str, Any]] | None = None) -> OrderedDict[str, Tensor]:
        """The levels on the student's batched input (a cache looks them up by the targets'
        ``image_id`` and ``hflip``)."""

    def head(self, levels: OrderedDict[str, Tensor], batch_shape: tuple[int, int]
             ) -> list[HeadLevel]:
        """The teacher's head predictions on its ``levels`` of one batch (a live teacher)."""

    def fingerprint(self) -> str:
        """A hash of the teacher's weights (a cache records the one it was written from)."""

    def to(self, fn: Any) -> None:
        """Apply a module ``_apply`` function (``.to()``, ``.double()``)."""

    def close(self) -> None:
        """Remove the teacher's hooks."""


class CachedTeacher:
    """A :class:`TeacherSource` reading the levels a teacher cache holds."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def measure(self) -> OrderedDict[str, LevelInfo]:
        return OrderedDict(self.cache.levels)

    def features(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]] | None = None,
                 targets: Sequence[dict[str, Any]] | None = None) -> OrderedDict[str, Tensor]:
        cache = self.cache
        if targets is None:
            raise ValueError("levels from a teacher cache are looked up by the targets' "
                             "image_id and hflip; this call has no targets")
        if tuple(batch.shape[-2:]) != cache.batch_shape:
            raise ValueError(f"the teacher cache {cache.root} holds levels of "
                             f"{cache.batch_shape} batches; this batch is "
                             f"{tuple(batch.shape[-2:])}")
        keys = []
        for t in targets:
            if "hflip" not in t and len(cache.variants) > 1:
                raise ValueError("the targets carry no 'hflip' entry, so the cached variant is "
                                 "unknown: use structkd.data.build_transforms for training")
            keys.append((int(t["image_id"]), int(bool(t.get("hflip", False)))))
        return cache.features(keys, device=batch.device, dtype=batch.dtype)

    def head(self, levels: OrderedDict[str, Tensor], batch_shape: tuple[int, int]
             ) -> list[HeadLevel]:
        raise ValueError(f"the teacher cache {self.cache.root} holds features only, no head "
                         "predictions")

    def queries(self, batch: Tensor, image_sizes: Any) -> list[QueryLayer]:
        raise ValueError(f"the teacher cache {self.cache.root} holds features only, no "
                         "decoder predictions")

    def fingerprint(self) -> str:
        return self.cache.teacher_fingerprint

    def to(self, fn: Any) -> None:
        """Nothing to move: levels go to each batch's device as they are read."""

    def close(self) -> None:
        """Nothing hooked."""


def teacher_source(teacher: nn.Module | TeacherCache, *, root: str | None = None,
                   layers: str | Sequence[str] | None = None,
                   dtype: TeacherDtype | torch.dtype | None = None,
                   device: str | torch.device | None = None,
                   student_norm: tuple[list[float], list[float]] | None = None
                   ) -> TeacherSource:
    """A teacher model frozen (eval, no gradient, on ``device`` if given; ``root`` / ``layers``
    default to its family's), or a cache as it is."""
    if isinstance(teacher, TeacherCache):
        return CachedTeacher(teacher)
    t_root, t_layers = family_defaults(teacher)
    return FrozenTeacher(teacher, root=t_root if root is None else root,
                         layers=t_layers if layers is None else layers, dtype=dtype,
                         student_norm=student_norm, device=device)


def choose_preset(cls: type[DistillMethod], student: nn.Module) -> str:
    """The method's preset for the student's family; a family it has none for falls back to
    the RetinaNet preset, with a warning saying what to do."""
    family = detector_family(student)
    if family in cls.presets:
        return family
    logger.warning("%s has no preset for %s students; falling back to its retinanet preset "
                   "%s, whose weight was tuned against RetinaNet's losses: with structkd's "
                   "engine set the weight to 'auto' (measured on the first batches) or a number "
                   "of your own (or the method option 'preset' to one of %s)",
                   cls.name, family, dict(cls.presets["retinanet"]), sorted(cls.presets))
    return "retinanet"


@dataclass(eq=False)
class Wiring:
    """What :func:`wire` built: the student's tap (``student_root`` takes the batch), the
    teacher source, the paired levels (``unpaired``: the levels of either side that found no
    partner), and the method (``options``: its options as built)."""

    tap: FeatureTap
    student_root: str
    student_layers: list[str]
    teacher: TeacherSource
    pairs: list[LevelPair]
    unpaired: tuple[list[str], list[str]]
    method: DistillMethod
    method_name: str
    options: dict[str, Any]
    head_view: Any = None  # the student's protocol where the method reads head outputs
    cross: Any = None  # CrossKD: (the method or part that adapts, the teacher's protocol)

    def head_outputs(self, t_levels: dict[str, Tensor], batch: Tensor, image_sizes: Any
                     ) -> dict[str, Any]:
        """After a student forward (its tap still holding the step): the context's head
        fields the method reads (none for a feature method), for every driver alike."""
        out: dict[str, Any] = {}
        shape = (int(batch.shape[-2]), int(batch.shape[-1]))
        if self.head_view is not None and self.method.needs_head == "detr":
            out["student_queries"], out["teacher_queries"] = self.queries(batch, image_sizes)
        elif self.head_view is not None:
            out["student_head"], out["teacher_head"] = self.heads(t_levels, shape)
        if self.cross is not None:
            out["cross_head"] = self.cross_heads(t_levels, shape)
        return out

    def queries(self, batch: Tensor, image_sizes: Any
                ) -> tuple[list[QueryLayer], list[QueryLayer]]:
        """After a student forward: both DETR-family detectors' predictions per decoder layer
        (the student's from its own forward, with gradient; the teacher run whole on the
        same batch)."""
        student = self.head_view.query_layers(self.tap.head()[1])
        teacher = self.teacher.queries(batch, image_sizes)  # type: ignore[attr-defined]
        return student, teacher

    def cross_heads(self, t_levels: dict[str, Tensor], batch_shape: tuple[int, int]
                    ) -> dict[str, HeadLevel]:
        """The teacher's head run from the cut on the student's head features (adapted by the
        method), decoded, by pair name; with gradient to the student."""
        method, t_view = self.cross
        feats = self.tap.cross()
        adapted = {k: [method.adapt(k, x) for x in xs] for k, xs in feats.items()}
        raw = t_view.run_head_from(method.cross_cut, adapted)
        levels = t_view.head_levels(raw, list(t_levels.values()), batch_shape)
        by = dict(zip(t_levels, levels, strict=True))
        return {p.name: _at_stride(by[p.teacher], p.stride) for p in self.pairs
                if p.name in self.method.levels}

    def heads(self, t_levels: dict[str, Tensor], batch_shape: tuple[int, int]
              ) -> tuple[dict[str, HeadLevel], dict[str, HeadLevel]]:
        """After a student forward: both heads' predictions by pair name (the student's from
        its own forward, with gradient; the teacher's head run on ``t_levels``, its levels of
        the same batch). Where one side has several anchors per location and the other one,
        the former keeps its best-scoring anchor per location."""
        inputs, raw = self.tap.head()
        student = self.head_view.head_levels(raw, inputs, batch_shape)
        teacher = self.teacher.head(t_levels, batch_shape)  # type: ignore[attr-defined]
        # The heads' levels come in the order of their inputs, the tapped levels: each takes
        # its level's measured stride (a tiny batch's coarse levels are 1 x 1 whatever it is).
        s_by = dict(zip(self.tap.levels(), student, strict=True))
        t_by = dict(zip(t_levels, teacher, strict=True))
        s_out: dict[str, HeadLevel] = {}
        t_out: dict[str, HeadLevel] = {}
        for p in self.pairs:
            if p.name not in self.method.levels:
                continue
            s, t = _at_stride(s_by[p.student], p.stride), _at_stride(t_by[p.teacher], p.stride)
            if s.logits.shape[-2:] != t.logits.shape[-2:]:
                raise ValueError(f"level {p.name}: the heads' grids differ (student "
                                 f"{tuple(s.logits.shape[-2:])}, teacher "
                                 f"{tuple(t.logits.shape[-2:])}) on one batch")
            if s.anchors != t.anchors:
                s, t = s.best_anchor(), t.best_anchor()
            s_out[p.name], t_out[p.name] = s, t
        return s_out, t_out

    def paired(self, student: dict[str, Tensor], teacher: dict[str, Tensor]
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both sides' maps by pair name (a student map resized to its teacher's size)."""
        return paired_maps(self.pairs, student, teacher)

    def fingerprint(self) -> str:
        return self.teacher.fingerprint()

    def retap(self, student: nn.Module) -> FeatureTap:
        """A fresh tap on the same layers of ``student`` (the old one closed): for a driver
        that lets a copy of the student be made without hooks first (Ultralytics' EMA)."""
        old = self.tap
        old.close()
        self.tap = FeatureTap(student, self.student_layers, input_path=old.input_path,
                              batch_path=old.batch_path, head_path=old.head_path,
                              cross_paths=old.cross_paths)
        return self.tap

    def close(self) -> None:
        """Remove the student's and the teacher's hooks."""
        self.tap.close()
        self.teacher.close()


def _build_one(name: str, student: nn.Module, pairs: list[LevelPair],
               levels: list[str] | None, options: dict[str, Any]
               ) -> tuple[DistillMethod, list[LevelPair]]:
    """One method on the pairs its preset distils (``options`` gains the chosen preset)."""
    cls, _ = resolve_method(name)
    preset = options.get("preset")
    if cls.presets and preset is None:
        preset = options["preset"] = choose_preset(cls, student)
    if levels is None and preset in cls.preset_strides:
        pairs = [p for p in pairs if p.stride in cls.preset_strides[preset]] or pairs
    return build_method(name, [p.level for p in pairs], **options), pairs


def _build_together(names: list[str], student: nn.Module, pairs: list[LevelPair],
                    levels: list[str] | None, options: dict[str, Any]
                    ) -> tuple[DistillMethod, list[LevelPair]]:
    """Several methods as one (``options``: ``weight``, the overall one, and one mapping of
    options per part, keyed by its name)."""
    keys = [n if names[:i].count(n) == 0 else f"{n}_{names[:i].count(n) + 1}"
            for i, n in enumerate(names)]  # a method twice: "mgd", "mgd_2"
    unknown = sorted(set(options) - {"weight", *keys})
    if unknown:
        raise ValueError(f"options {unknown} of method {'+'.join(names)!r}: options of several "
                         f"methods are given per method, e.g. {{{keys[0]!r}: {{...}}}}, under "
                         f"the names {keys} (and 'weight', the overall weight)")
    parts: dict[str, DistillMethod] = {}
    used: dict[str, LevelPair] = {}
    for key, n in zip(keys, names, strict=True):
        own = options.get(key) or {}
        if not isinstance(own, dict):
            raise ValueError(f"options of {key!r}: {own!r}; expected a mapping of its options")
        own = dict(own)
        parts[key], mine = _build_one(n, student, pairs, levels, own)
        options[key] = own  # with the chosen preset, as built
        used.update({p.name: p for p in mine})
    together = Together(parts, weight=options.get("weight", 1.0))
    return together, [p for p in pairs if p.name in used]


def _crossing(method: DistillMethod) -> DistillMethod | None:
    """The method (or part of several) that runs the teacher's head on the student's head
    features (CrossKD), if any."""
    members = [m for _, m in method.members()] if isinstance(method, Together) else [method]
    found = [m for m in members if m.cross_cut is not None]
    if len(found) > 1:
        raise ValueError("two cross-head methods in one distillation; combine one at most")
    return found[0] if found else None


def _at_stride(level: HeadLevel, stride: int) -> HeadLevel:
    """``level`` with its measured ``stride`` (its centres kept where they were in pixels)."""
    if level.stride == stride:
        return level
    return dataclasses.replace(level, stride=stride, offset=level.offset * level.stride / stride)


def _same_model(a: nn.Module, b: nn.Module) -> bool:
    """Whether two detectors are one model (also one wrapped, the other not)."""
    def models(m: nn.Module) -> set[int]:
        inner = unwrap(m)
        return {id(inner), id(getattr(inner, "model", inner))}
    return bool(models(a) & models(b))


def wire(student: nn.Module, teacher: nn.Module | TeacherCache,
         method: str | list[str] | DistillMethod = DEFAULT_METHOD, *,
         levels: list[str] | None = None,
         student_layers: str | list[str] | None = None,
         teacher_layers: str | list[str] | None = None, teacher_root: str | None = None,
         teacher_dtype: TeacherDtype | torch.dtype | None = None,
         teacher_device: str | torch.device | None = None,
         student_norm: tuple[list[float], list[float]] | str | None = "protocol",
         record_batch: bool = True, isolate_rng: bool = False, **options: Any) -> Wiring:
    """Build one distillation's wiring (see the module's docstring).

    ``student`` is the module that trains (``structkd.detectors.as_detector``'s); ``teacher``
    a detector or a :class:`~structkd.distill.TeacherCache`; the keywords are the
    ``Distiller``'s. ``student_norm``: the normalisation of the batch the teacher is given
    ("protocol": the student's own); ``record_batch``: the tap also records the student's
    batch (its batching module's output, else its root's input), for drivers that do not hold
    the batch themselves; ``isolate_rng``: the method's random initialisation leaves the global
    random stream as it was (so that runs with and without distillation draw the same data
    order and augmentation where the driver seeded before building it). Options not accepted
    by the method are an error naming the valid ones; a failure leaves no hook behind.
    """
    if not isinstance(teacher, TeacherCache) and _same_model(student, teacher):
        raise ValueError("student and teacher are the same module; pass two detectors")
    view = protocol_of(student)
    s_root, s_default = view.root, view.taps
    layers = s_default if student_layers is None else student_layers
    s_layers = [layers] if isinstance(layers, str) else list(layers)
    for name, paths in (("student_layers", s_layers), ("teacher_layers", teacher_layers)):
        if paths is None:
            continue
        if not paths or not all(isinstance(p, str) and p for p in (
                [paths] if isinstance(paths, str) else paths)):
            raise ValueError(f"{name}={paths!r}; expected a module path (e.g. 'backbone') or a "
                             "non-empty list of them")
    # The batch: the protocol's batching module's output, else the input of the student's root
    # (or of the first tapped module's top-level parent, for taps outside the root).
    if not any(p == s_root or p.startswith(s_root + ".") or not s_root for p in s_layers):
        s_root = s_layers[0].split(".")[0]
    find_module(student, s_root, "student")
    batch_path = view.batch_path if record_batch else None
    if isinstance(method, DistillMethod):
        classes: list[Any] = [m for _, m in method.members()] if isinstance(
            method, Together) else [method]
    else:
        classes = [resolve_method(n)[0] for n in split_names(method)]
    head_view = None
    for cls in classes:
        if cls.needs_head:
            check_heads(cls, view, teacher, student_layers=student_layers,
                        teacher_layers=teacher_layers, teacher_root=teacher_root)
            head_view = view
    tap = FeatureTap(student, s_layers,
                     input_path=s_root if record_batch and batch_path is None else None,
                     batch_path=batch_path,
                     head_path=view.head_path if head_view is not None else None)
    source: TeacherSource | None = None
    try:
        if isinstance(teacher, TeacherCache):  # the cache's own levels; the names only label
            source = CachedTeacher(teacher)
            t_levels = source.measure()
        else:
            norm = view.normalisation() if student_norm == "protocol" else student_norm
            source = teacher_source(teacher, root=teacher_root, layers=teacher_layers,
                                    dtype=teacher_dtype, device=teacher_device,
                                    student_norm=norm)  # type: ignore[arg-type]
            t_levels = source.measure()
        s_levels = measure_levels(student, tap, s_root, role="student")
        pairs = pair_levels(s_levels, t_levels, levels)
        unpaired = ([k for k in s_levels if k not in {p.student for p in pairs}],
                    [k for k in t_levels if k not in {p.teacher for p in pairs}])
        if isinstance(method, DistillMethod):
            if options:
                raise ValueError("method options are only accepted with a method name")
            missing = [n for n in method.levels if n not in {p.name for p in pairs}]
            if missing:
                raise ValueError(f"the method was built for levels {list(method.levels)}, but "
                                 f"the detectors share only {[p.name for p in pairs]}")
            pairs = [p for p in pairs if p.name in method.levels]
            built, name = method, method.name
        else:
            device = next(iter(student.parameters()), torch.empty(0)).device
            names = split_names(method)
            with contextlib.ExitStack() as stack:
                if isolate_rng:
                    stack.enter_context(torch.random.fork_rng(
                        devices=[device] if device.type == "cuda" else []))
                if len(names) == 1:
                    built, used = _build_one(names[0], student, pairs, levels, options)
                    pairs = used
                else:
                    built, pairs = _build_together(names, student, pairs, levels, options)
                built = built.to(device)
            name = SEPARATOR.join(names)
        cross = _crossing(built)
        if cross is not None:  # the tap also reads the student's head features at the cut
            t_view = protocol_of(teacher)  # type: ignore[arg-type]
            kinds = (view.head_info().name, t_view.head_info().name)
            if kinds[0] != kinds[1]:
                raise ValueError(f"{cross.name} runs the student's head features through the "
                                 f"teacher's head: the heads must be of one design; the "
                                 f"student's is {kinds[0]}'s, the teacher's {kinds[1]}'s")
            t_view.cross_cuts(cross.cross_cut)  # the teacher's head can be cut there
            tap.close()
            tap = FeatureTap(student, s_layers, input_path=tap.input_path,
                             batch_path=tap.batch_path, head_path=tap.head_path,
                             cross_paths=view.cross_cuts(cross.cross_cut))
            cross = (cross, t_view)
    except BaseException:
        tap.close()
        if source is not None:
            source.close()
        raise
    return Wiring(tap, s_root, s_layers, source, pairs, unpaired, built, name, dict(options),
                  head_view, cross)


_KINDS = {"dense": "a dense head's predictions per location (RetinaNet, FCOS, YOLO)",
          "detr": "a DETR decoder's predictions per query (RT-DETR, D-FINE)"}


def check_heads(cls: type[DistillMethod] | DistillMethod, student_view: Any,
                teacher: nn.Module | TeacherCache, *, student_layers: Any = None,
                teacher_layers: Any = None, teacher_root: str | None = None) -> None:
    """Refuse, in one line saying why, a pair whose heads a head-level method cannot read:
    a teacher cache (it holds features only), a head of another kind than the method reads,
    no box distributions where the method needs them, different class counts, or taps moved
    off the head's inputs (the teacher's head runs on its tapped levels)."""
    name = cls.name
    if isinstance(teacher, TeacherCache):
        raise ValueError(f"method {name!r} distils the teacher's head predictions; a teacher "
                         f"cache ({teacher.root}) holds its features only: train with the live "
                         "teacher (drop teacher.cache)")
    moved = {k: v for k, v in (("student_layers", student_layers),
                               ("teacher_layers", teacher_layers),
                               ("teacher_root", teacher_root)) if v is not None}
    if moved:
        raise ValueError(f"method {name!r} reads the heads, which run on their families' "
                         f"default levels; leave {sorted(moved)} unset")
    t_view = protocol_of(teacher)
    for role, v in (("student", student_view), ("teacher", t_view)):
        info = v.head_info()
        if info.kind is None:
            raise ValueError(f"{name} needs {_KINDS[cls.needs_head]}; the {role}'s head gives "
                             f"none: {info.why}")
        if info.kind != cls.needs_head:
            raise ValueError(f"{name} needs {_KINDS[cls.needs_head]}; the {role} {info.name} "
                             f"gives {_KINDS[info.kind]}")
        if cls.needs_distribution and not info.bins:
            raise ValueError(f"{name} needs box distributions; the {role} {info.why}")
    if cls.needs_distribution:
        bins = (student_view.head_info().bins, t_view.head_info().bins)
        if bins[0] != bins[1]:
            raise ValueError(f"{name} compares box distributions bin by bin; the student's "
                             f"head has {bins[0]} bins per edge, the teacher's {bins[1]}")
    k = (student_view.num_classes, t_view.num_classes)
    if cls.compares_classes and None not in k and k[0] != k[1]:
        raise ValueError(f"{name} distils class scores class by class; the student has "
                         f"{k[0] - 1} object classes, the teacher {k[1] - 1}")

