"""The Lightning module: a ``Distiller`` (or a plain detector) wired to optimiser and evaluation.

Lightning owns devices, DDP, precision, checkpoints and logging; this module only says what a
training step, a validation pass and the optimiser are, and what a checkpoint carries besides
the weights: the run's identity (method, options, levels, teacher fingerprint) and every RNG.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig
from ..distill import DetectorLosses, Distiller
from ..evaluation import coco_metrics, predictions_to_coco


def lr_factor(step: int, steps_per_epoch: float, sched: ScheduleConfig) -> float:
    """Linear warm-up, then a step decay by ``gamma`` at each milestone epoch (milestones may be
    fractions of an epoch: with one pass over many generated images, 0.8 is 80% of the way)."""
    warm = 1.0
    if step < sched.warmup_iters:
        warm = sched.warmup_ratio + (1 - sched.warmup_ratio) * step / sched.warmup_iters
    epoch = step / steps_per_epoch if math.isfinite(steps_per_epoch) else 0.0
    return warm * sched.gamma ** sum(epoch >= m for m in sched.milestones)


@dataclass
class EvalInfo:
    """What COCO evaluation needs: the ground truth, label -> category id, names by category."""

    coco_gt: dict[str, Any]
    label_to_cat_id: dict[int, int]
    class_names: list[str] = field(default_factory=list)  # by contiguous label, 0 = background

    def names_by_category(self) -> dict[int, str]:
        return {self.label_to_cat_id[label]: name for label, name in enumerate(self.class_names)
                if label in self.label_to_cat_id}


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from (torch CPU and CUDA, NumPy, Python)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {  # plain types and tensors: loadable with weights_only=True
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class DetectionModule(L.LightningModule):
    """Trains ``net`` (a ``Distiller`` or ``DetectorLosses``) and evaluates its student.

    ``run_meta`` is what identifies the run (spec, labels, method, options, levels, teacher
    fingerprint); it is saved in every checkpoint under ``"structkd"`` and compared on resume.
    """

    def __init__(
        self, net: Distiller | DetectorLosses, *, optim: OptimConfig | None = None,
        schedule: ScheduleConfig | None = None, eval_info: EvalInfo | None = None,
        run_meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optim_cfg = optim or OptimConfig()
        self.sched_cfg = schedule or ScheduleConfig()
        self.eval_info = eval_info
        self.run_meta = dict(run_meta or {})
        self.resumed_meta: dict[str, Any] | None = None
        self._val_detections: list[dict[str, Any]] = []
        self._val_seen: set[int] = set()
        self.step_times: list[float] = []
        self._t0: float | None = None
        self.last_metrics: dict[str, Any] = {}
        self.metrics_step: int | None = None  # global step at which last_metrics were measured
        self.last_losses: dict[str, float] = {}

    @property
    def student(self) -> nn.Module:
        return self.net.student

    # ---- training -------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.net(images, targets)
        total = torch.stack([v.float() for v in losses.values()]).sum()
        n = len(images)
        logged = {f"train/{k}": v.detach() for k, v in losses.items()}
        logged.update({f"train/{k}": v for k, v in self.net.level_values().items()})
        logged["train/loss"] = total.detach()
        self.log_dict(logged, batch_size=n, on_step=True, on_epoch=False)
        self.log("loss", total.detach(), prog_bar=True, batch_size=n, logger=False)
        distill_terms = [v for k, v in losses.items() if k.startswith("distill")]
        if distill_terms:
            self.log("distill", torch.stack(distill_terms).sum().detach(), prog_bar=True,
                     batch_size=n, logger=False)
        self.last_losses = {k: v.detach() for k, v in losses.items()}
        return total

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._t0 is not None:
            self.step_times.append(time.perf_counter() - self._t0)

    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.net.parameters() if p.requires_grad]
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum,
                                  weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        trainer = self.trainer

        def factor(step: int) -> float:
            nb = trainer.num_training_batches
            steps_per_epoch = nb if isinstance(nb, int | float) and nb > 0 else math.inf
            return lr_factor(step, steps_per_epoch, self.sched_cfg)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_detections, self._val_seen = [], set()

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.eval_info is None:
            return
        images, targets = batch
        ids = [int(t["image_id"]) for t in targets]
        keep = [i for i, image_id in enumerate(ids) if image_id not in self._val_seen]
        if not keep:
            return
        outputs = self.student([images[i] for i in keep])
        kept_ids = [ids[i] for i in keep]
        self._val_seen.update(kept_ids)
        self._val_detections += predictions_to_coco(
            outputs, kept_ids, self.eval_info.label_to_cat_id
        )

    def on_validation_epoch_end(self) -> None:
        if self.eval_info is None:
            return
        detections, seen_ids = self._val_detections, set(self._val_seen)
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (sorted(self._val_seen), detections))
            seen: set[int] = set()
            detections = []
            for ids, dets in gathered:  # drop the images DDP padding repeated on another rank
                new = set(ids) - seen
                detections += [d for d in dets if d["image_id"] in new]
                seen |= new
            seen_ids = seen
        # Only the images this pass ran count (data.limit_val may cut the split short).
        metrics = coco_metrics(
            self.eval_info.coco_gt, detections,
            class_names=self.eval_info.names_by_category(), image_ids=seen_ids,
        )
        self.last_metrics = metrics
        self.metrics_step = self.global_step
        scalars = {f"val/{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.log_dict(scalars, sync_dist=False, rank_zero_only=True)
        self.log("AP", float(metrics["AP"]), prog_bar=True, logger=False, rank_zero_only=True)

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["structkd"] = {**self.run_meta, "rng": rng_states()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("structkd")
        if not isinstance(meta, dict):
            raise ValueError("the checkpoint is not one of a structkd run (no 'structkd' entry)")
        self.resumed_meta = meta
        if "rng" in meta:
            set_rng_states(meta["rng"])
