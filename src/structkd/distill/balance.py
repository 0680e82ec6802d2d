"""Loss weights by measurement: how hard each loss pulls on the student, and the weight that sets
the distillation term's pull to a chosen share of the detection loss's.

Per-paper weights (MGD 2e-5, FGD 5e-6, ...) do not transfer across detectors, data or feature
scales; a distillation term that swamps the detection loss is the commonest cause of
"distillation made it worse". Here the weight is set from the gradient norms of the two losses on
the student's parameters that both reach (the backbone and neck up to the tapped levels):
``weight = ratio * |g_detection| / |g_distill(weight 1)|``, averaged over a few batches of the
untrained student. Pure torch: usable in any training loop.

    cal = calibrate_weight(distiller, [(images, targets), ...], ratio=DEFAULT_RATIO)
    cal.weight  # now the method's weight
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..methods.together import Together

if TYPE_CHECKING:
    from .distiller import Distiller

__all__ = ["DEFAULT_RATIO", "Calibration", "GradNorms", "calibrate_weight", "grad_norms",
           "preserved_state", "split_losses", "student_parameters"]

# |g_distill| / |g_detection| that ``weight: auto`` aims for. Measured on the built-in study's
# untrained student (``python benchmarks/balance.py``): the paper weights start at SSIM
# (lambda 2) 6.6, L2 (2) 5.4, PKD 42, CWD 59, MGD 0.36, FGD 499; the methods that helped most
# there span 0.36 (MGD) to 59 (CWD). 5 is close to SSIM's published weight, the library's method.
DEFAULT_RATIO = 5.0


def split_losses(losses: Mapping[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """(detection, distillation) sums of a ``Distiller`` loss dict ("distill*" keys are the
    method's terms); None for a part with no term."""
    parts: tuple[list[Tensor], list[Tensor]] = ([], [])
    for k, v in losses.items():
        parts[k.startswith("distill")].append(v.float())
    det, dis = (torch.stack(vs).sum() if vs else None for vs in parts)
    return det, dis


def student_parameters(distiller: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The student's trainable parameters, by name (the method's own parts are not the
    student's: only it is deployed)."""
    return [(n, p) for n, p in distiller.student.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class GradNorms:
    """Gradient norms of one step's two losses on the student parameters both reach."""

    detection: float
    distill: float
    shared: int  # parameter tensors that both losses reach
    distill_reached: int  # parameter tensors the distillation term reaches

    @property
    def ratio(self) -> float:
        """|g_distill| / |g_detection| (inf when the detection gradient is 0)."""
        return self.distill / self.detection if self.detection > 0 else float("inf")


def total_norm(grads: Iterable[Tensor]) -> float:
    """The 2-norm of several gradient tensors taken as one vector (0 for none)."""
    norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def grad_norms(losses: Mapping[str, Tensor], params: Sequence[Tensor], *,
               retain_graph: bool = True) -> GradNorms:
    """The norms of the detection and the distillation gradients on those of ``params`` that
    both losses reach, computed with ``torch.autograd.grad`` (``.grad`` is left untouched)."""
    det, dis = split_losses(losses)
    if det is None or dis is None:
        raise ValueError(f"the losses {sorted(losses)} lack a detection or a distillation term")
    params = list(params)
    none: tuple[None, ...] = (None,) * len(params)
    g_det = torch.autograd.grad(det, params, retain_graph=True, allow_unused=True) \
        if det.requires_grad else none
    g_dis = torch.autograd.grad(dis, params, retain_graph=retain_graph, allow_unused=True) \
        if dis.requires_grad else none
    shared = [i for i, (a, b) in enumerate(zip(g_det, g_dis, strict=True))
              if a is not None and b is not None]
    return GradNorms(detection=total_norm(g_det[i] for i in shared),
                     distill=total_norm(g_dis[i] for i in shared), shared=len(shared),
                     distill_reached=sum(g is not None for g in g_dis))


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Run probes on ``module`` without leaving a trace: its buffers (BatchNorm statistics),
    its train/eval modes and torch's random state are restored on exit."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    modes = {m: m.training for m in module.modules()}
    devices = sorted({b.device.index or 0 for b in buffers.values() if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for n, b in module.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        for m, mode in modes.items():
            m.training = mode


@dataclass
class Calibration:
    """What ``weight: auto`` measured and chose."""

    weight: float
    ratio: float  # the target |g_distill| / |g_detection|
    batches: int
    detection_norm: float  # mean over the batches
    unit_distill_norm: float  # mean over the batches, at weight 1
    per_batch: list[dict[str, float]] = field(default_factory=list)
    parts: dict[str, dict[str, float]] = field(default_factory=dict)  # several methods: each

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_weight(distiller: Distiller, batches: Iterable[tuple[Any, Any]], *,
                     ratio: float = DEFAULT_RATIO,
                     reduce: Callable[[Tensor], Tensor] | None = None) -> Calibration:
    """Set ``distiller``'s weight so that the distillation gradient's norm is ``ratio`` times
    the detection gradient's, on the student parameters both reach, averaged over ``batches``
    of ``(images, targets)`` (on the student's device). The student's statistics, modes and
    the random state are left as they were; returns what was measured.

    ``reduce``: averages the two mean norms (a float64 tensor of 2) over processes, so that
    every DDP rank sets the same weight (e.g. ``trainer.strategy.reduce(t, reduce_op="mean")``).
    """
    check_positive("ratio", ratio)
    method = distiller.method
    if isinstance(method, Together):  # each part as if alone, the overall weight then 1
        before = method.part_weights.clone()
        parts: dict[str, dict[str, Any]] = {}
        batches = list(batches)
        try:
            for i, (name, _) in enumerate(method.members()):
                with torch.no_grad():
                    method.part_weights.zero_()
                    method.part_weights[i] = 1.0
                one = _measure(distiller, batches, ratio, reduce, f"part {name!r}: ")
                parts[name] = {"weight": one.weight, "detection_norm": one.detection_norm,
                               "unit_distill_norm": one.unit_distill_norm,
                               "per_batch": one.per_batch}
        finally:
            with torch.no_grad():
                method.part_weights.copy_(before)
        for name, got in parts.items():
            method.set_part_weight(name, got["weight"])
        rows = next(iter(parts.values()))["per_batch"]
        cal = Calibration(weight=1.0, ratio=ratio, batches=len(rows),
                          detection_norm=statistics.fmean(r["detection"] for r in rows),
                          unit_distill_norm=0.0,  # per part, in ``parts``
                          parts={n: {k: v for k, v in p.items() if k != "per_batch"}
                                 for n, p in parts.items()})
    else:
        cal = _measure(distiller, batches, ratio, reduce, "")
    distiller.set_weight(cal.weight)
    distiller.calibration = cal
    return cal


def _measure(distiller: Distiller, batches: Iterable[tuple[Any, Any]], ratio: float,
             reduce: Callable[[Tensor], Tensor] | None, what: str) -> Calibration:
    """The weight that sets the distillation gradient's norm to ``ratio`` times the
    detection's (measured at weight 1); sets nothing."""
    params = [p for _, p in student_parameters(distiller)]
    rows: list[dict[str, float]] = []
    with preserved_state(distiller), distiller.probing(weight=1.0):
        distiller.train()
        for images, targets in batches:
            n = grad_norms(distiller(images, targets), params, retain_graph=False)
            rows.append({"detection": n.detection, "distill": n.distill, "shared": n.shared})
    if not rows:
        raise ValueError("calibrate_weight got no batches; expected at least one")
    det = statistics.fmean(r["detection"] for r in rows)
    dis = statistics.fmean(r["distill"] for r in rows)
    if reduce is not None:
        det, dis = (float(v) for v in reduce(torch.tensor([det, dis], dtype=torch.float64,
                                                           device=params[0].device)))
    if not (0 < det < math.inf and 0 < dis < math.inf):
        raise ValueError(
            f"cannot set the weight: {what}on {len(rows)} batch(es) the detection gradient's "
            f"norm is {det:.4g} and the distillation term's (weight 1) {dis:.4g} on the "
            f"{rows[0]['shared']:.0f} student parameter tensors both reach; expected two "
            "finite, non-zero norms")
    return Calibration(weight=ratio * det / dis, ratio=ratio, batches=len(rows),
                       detection_norm=det, unit_distill_norm=dis, per_batch=rows)
