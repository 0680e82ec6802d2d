"""Measure the tapped levels by a dry run and pair student and teacher levels by stride.

The dry run is the one source of truth for strides and widths: whatever the detector, its
tapped maps on a blank ``DRY_RUN_SIZE`` square image give ``stride = size / width``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods import Level
from ..precision import no_autocast
from .taps import FeatureTap, find_module

DRY_RUN_SIZE = 512  # divisible by every power-of-two stride up to 512, so strides come out exact


@dataclass(frozen=True)
class LevelInfo:
    """A tapped map's stride (input pixels per cell) and channel count."""

    stride: int
    channels: int


@dataclass(frozen=True)
class LevelPair:
    """A student level matched to a teacher level of the same stride."""

    name: str  # "s8", the key used by the method, adapters and logs
    student: str  # the student's level key
    teacher: str  # the teacher's level key
    stride: int
    student_channels: int
    teacher_channels: int

    @property
    def level(self) -> Level:
        return Level(self.name, self.stride, self.student_channels, self.teacher_channels)


@torch.no_grad()
def measure_levels(model: nn.Module, tap: FeatureTap, root: str,
                   size: int = DRY_RUN_SIZE, *, role: str = "model"
                   ) -> OrderedDict[str, LevelInfo]:
    """Run ``root`` of ``model`` once on a blank image (eval mode) and read the tapped levels.

    A tapped module that does not run from ``root``, or a root that does not take an image
    batch, is a ValueError naming the taps and the root (``role``: "student" / "teacher", for
    the message). Autocast is off for it: only shapes are read, and a bfloat16 CPU autocast
    region around a ``Distiller``'s construction made this 512 px run a hundred times slower.
    """
    module = find_module(model, root, role)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()  # never touch BatchNorm running statistics in a dry run
    where = f"'{root}'" if root else f"the {role}"
    try:
        tap.clear()
        with no_autocast(device):
            try:
                tap.run_until_complete(module, torch.zeros(1, 3, size, size, device=device,
                                                           dtype=dtype))
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                first = (str(e).splitlines() or [""])[0][:200]
                raise ValueError(
                    f"{role} taps {tap.paths}: {where} failed on a blank {size}x{size} image "
                    f"batch ({type(e).__name__}: {first}); tap modules that run in the "
                    f"detector's forward after the module taking the batched images, and name "
                    "that module as the root (teacher_root; a student's root is its family's, "
                    "or the top-level parent of its first tap)") from None
        missing = [p for p in tap.paths if not tap.recorded(p)]
        if missing:
            raise ValueError(f"{role} taps {missing} never ran when {where} ran on a blank "
                             "image batch: tap modules that the detector's forward calls "
                             "after that point")
        levels = tap.levels()
    finally:
        model.train(was_training)
        tap.clear()
    out: OrderedDict[str, LevelInfo] = OrderedDict()
    for k, v in levels.items():
        out[k] = LevelInfo(max(1, round(size / v.shape[-1])), v.shape[1])
    return out


def pair_levels(student: dict[str, LevelInfo], teacher: dict[str, LevelInfo],
                names: list[str] | None = None) -> list[LevelPair]:
    """Pair levels of equal stride, in the student's order; several levels of one stride pair
    in order. ``names`` keeps only those pairs (e.g. ``["s8", "s16"]``)."""
    t_by_stride: dict[int, list[tuple[str, LevelInfo]]] = {}
    for k, info in teacher.items():
        t_by_stride.setdefault(info.stride, []).append((k, info))
    pairs: list[LevelPair] = []
    used: dict[int, int] = {}
    for k, info in student.items():
        candidates = t_by_stride.get(info.stride, [])
        i = used.get(info.stride, 0)
        if i >= len(candidates):
            continue
        used[info.stride] = i + 1
        t_key, t_info = candidates[i]
        name = f"s{info.stride}" if i == 0 else f"s{info.stride}_{i}"
        pairs.append(LevelPair(name, k, t_key, info.stride, info.channels, t_info.channels))
    if not pairs:
        raise ValueError(
            "no tapped level of the student has the stride of a teacher level: student "
            f"{ {k: v.stride for k, v in student.items()} }, teacher "
            f"{ {k: v.stride for k, v in teacher.items()} } (level: stride)"
        )
    if names is not None:
        known = [p.name for p in pairs]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"levels {unknown} are not shared; expected some of {known}")
        pairs = [p for p in pairs if p.name in names]
    return pairs


def paired_maps(pairs: list[LevelPair], student: dict[str, Tensor], teacher: dict[str, Tensor]
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The student's and the teacher's maps by pair name; a student map of another size than
    its teacher's (rounding of odd sizes) is resized to it, bilinearly."""
    s_maps, t_maps = {}, {}
    for p in pairs:
        s, t = student[p.student], teacher[p.teacher]
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        s_maps[p.name], t_maps[p.name] = s, t
    return s_maps, t_maps
