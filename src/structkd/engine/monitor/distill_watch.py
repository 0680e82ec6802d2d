"""While a distillation run trains: how large the term is, how hard it pulls, and whether it has
gone quiet. A Lightning callback with that one job (and, with ``auto_every``, keeping the pull at
its target).

Every step it reads the step's loss terms (already on the host for the divergence guard). Every
``Balance.grad_every`` steps, before the step, it measures on the step's own batch and weights
the gradient norms of the detection loss and of the distillation term on the student parameters
both reach, by a probing pass of the unwrapped ``Distiller`` that leaves no trace (statistics and
random state restored; outside DDP's wrapper, whose reducer must see only the real backward),
and logs ``train/grad_ratio`` beside the per-level values. It warns once when the term stays at
0 or constant for ``watch_stall`` steps, and when the ratio leaves ``watch_band``. ``summary``
(also in ``results.json``) says how large the term was relative to the detection loss over the
run.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

import lightning as L
import torch

from ...distill import (
    Distiller,
    grad_norms,
    preserved_state,
    split_losses,
    student_parameters,
)
from ..options import Balance

logger = logging.getLogger("structkd.engine")

__all__ = ["DistillWatch"]


class DistillWatch(L.Callback):
    """Watches the distillation term; see the module docstring."""

    def __init__(self, balance: Balance | None = None) -> None:
        self.balance = balance or Balance()
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.sum_distill = 0.0
        self.sum_detection = 0.0
        self.ratios: list[float] = []
        self.weights: list[float] = []
        self._last: float | None = None
        self._same = 0
        self._stall_warned = False
        self._out_of_band = False
        self.summary: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        net = getattr(pl_module, "net", None)
        every = self.balance.grad_every
        if not isinstance(net, Distiller) or not every or trainer.global_step % every:
            return
        images, targets = batch
        params = [p for _, p in student_parameters(net)]
        with preserved_state(net), net.probing():
            norms = grad_norms(net(images, targets), params, retain_graph=False)
        local = torch.tensor([norms.detection, norms.distill], dtype=torch.float64,
                             device=pl_module.device)
        g_det, g_dis = (float(v) for v in trainer.strategy.reduce(local, reduce_op="mean"))
        ratio = g_dis / g_det if g_det > 0 else math.inf
        self.ratios.append(ratio)
        pl_module.log_dict({"train/grad_ratio": ratio, "train/grad_norm_detection": g_det,
                            "train/grad_norm_distill": g_dis, "train/distill_weight": net.weight},
                           on_step=True, on_epoch=False, batch_size=len(images))
        self._watch_band(ratio, trainer.global_step)
        auto = self.balance.auto_every
        if net.auto_weight and auto and trainer.global_step % auto == 0 and g_dis > 0 \
                and net.weight > 0:
            target = self.balance.auto_ratio * g_det / (g_dis / net.weight)
            new = math.exp(0.5 * math.log(net.weight) + 0.5 * math.log(target))
            net.set_weight(new)  # this step already trains with it
            self.weights.append(new)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        net = getattr(pl_module, "net", None)
        losses = getattr(pl_module, "last_losses", None)
        if not isinstance(net, Distiller) or not losses:
            return
        det, dis = (0.0 if v is None else float(v) for v in split_losses(losses))
        self.steps += 1
        self.sum_distill += dis
        self.sum_detection += det
        self._watch_stall(dis, trainer.global_step)

    def _watch_stall(self, value: float, step: int) -> None:
        limit = self.balance.watch_stall
        same = self._last is not None and abs(value - self._last) <= 1e-7 * max(abs(value), 1e-30)
        self._same = self._same + 1 if (same or value == 0.0) else 0
        self._last = value
        if limit and self._same >= limit and not self._stall_warned:
            self._stall_warned = True
            logger.warning("the distillation term has stayed at %.6g for %d steps (step %d): "
                           "it no longer moves the student; check the method and its weight",
                           value, self._same, step)

    def _watch_band(self, ratio: float, step: int) -> None:
        low, high = self.balance.watch_band
        inside = low <= ratio <= high
        if not inside and not self._out_of_band:
            logger.warning("at step %d the distillation gradient's norm is %.3g times the "
                           "detection gradient's, outside [%g, %g]: %s", step, ratio, low, high,
                           "the distillation term swamps the detection loss (lower the weight, "
                           "or weight: auto)" if ratio > high else "the distillation term "
                           "hardly moves the student (raise the weight, or weight: auto)")
        self._out_of_band = not inside

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = getattr(pl_module, "net", None)
        if not isinstance(net, Distiller) or not self.steps:
            return
        mean_dis = self.sum_distill / self.steps
        mean_det = self.sum_detection / self.steps
        finite = [r for r in self.ratios if math.isfinite(r)]
        self.summary = {
            "steps": self.steps, "distill_mean": mean_dis, "detection_mean": mean_det,
            "distill_share": mean_dis / (mean_dis + mean_det) if mean_dis + mean_det else None,
            "grad_ratio_median": statistics.median(finite) if finite else None,
            "grad_ratio_first": finite[0] if finite else None,
            "grad_ratio_last": finite[-1] if finite else None,
            "grad_measurements": len(self.ratios), "weight_final": net.weight,
            "weight_updates": len(self.weights),
        }
        s = self.summary
        logger.info(
            "distillation over %d steps (this session): the term averaged %.4g, %.0f%% of the "
            "training loss (detection %.4g)%s; final weight %.4g", s["steps"], mean_dis,
            100 * (s["distill_share"] or 0.0), mean_det,
            "" if s["grad_ratio_median"] is None else
            f"; gradient-norm ratio median {s['grad_ratio_median']:.3g} over "
            f"{s['grad_measurements']} measurement(s)", net.weight)
