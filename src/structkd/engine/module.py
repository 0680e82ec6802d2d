"""The Lightning module: wires a ``Distiller`` (or a plain detector) to optimiser and evaluation.

Lightning owns devices, DDP, precision, checkpoints and logging; this module only says what a
training step, a validation pass and the optimiser are.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from ..config import DistillConfig, OptimConfig, ScheduleConfig
from ..distill import DetectorLosses, Distiller
from ..evaluation import coco_metrics, predictions_to_coco
from ..models import DetectorSpec


def lr_factor(step: int, steps_per_epoch: float, sched: ScheduleConfig) -> float:
    """Linear warm-up, then a step decay by ``gamma`` at each milestone epoch."""
    warm = 1.0
    if step < sched.warmup_iters:
        warm = sched.warmup_ratio + (1 - sched.warmup_ratio) * step / sched.warmup_iters
    epoch = int(step // steps_per_epoch) if math.isfinite(steps_per_epoch) else 0
    return warm * sched.gamma ** sum(epoch >= m for m in sched.milestones)


class DetectionModule(L.LightningModule):
    """Trains ``student`` (with ``teacher`` features when given) and evaluates it with COCO AP."""

    def __init__(
        self, student: nn.Module, spec: DetectorSpec, *, teacher: nn.Module | None = None,
        distill: DistillConfig | None = None, optim: OptimConfig | None = None,
        schedule: ScheduleConfig | None = None, eval_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.distill_cfg = distill or DistillConfig()
        self.optim_cfg = optim or OptimConfig()
        self.sched_cfg = schedule or ScheduleConfig()
        if teacher is not None and self.distill_cfg.distance != "none":
            d = self.distill_cfg
            self.net: nn.Module = Distiller(
                student, teacher, distance=d.distance, weight=d.weight, adapter=d.adapter,
                levels=d.levels, teacher_dtype=d.teacher_dtype, **d.options,
            )
        else:
            self.net = DetectorLosses(student)
        self.eval_info = eval_info or {}
        self._val_detections: list[dict[str, Any]] = []
        self._val_seen: set[int] = set()
        self.step_times: list[float] = []
        self._t0: float | None = None
        self.last_metrics: dict[str, Any] = {}
        self.metrics_step: int | None = None  # global step at which last_metrics were measured

    @property
    def student(self) -> nn.Module:
        return self.net.student

    # ---- training -------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.net(images, targets)
        total = losses["loss"]
        if not torch.isfinite(total):
            terms = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step} (epoch {self.current_epoch}): "
                f"{terms}; the last good checkpoint is kept in the run's checkpoints/ folder"
            )
        logged = {f"train/{k}": v.detach() for k, v in losses.items()}
        self.log_dict(logged, batch_size=len(images), on_step=True, on_epoch=False)
        self.log("loss", total.detach(), prog_bar=True, batch_size=len(images), logger=False)
        if "distill" in losses:
            self.log("distill", losses["distill"].detach(), prog_bar=True,
                     batch_size=len(images), logger=False)
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
        images, targets = batch
        ids = [int(t["image_id"]) for t in targets]
        keep = [i for i, image_id in enumerate(ids) if image_id not in self._val_seen]
        if not keep:
            return
        outputs = self.student([images[i] for i in keep])
        kept_ids = [ids[i] for i in keep]
        self._val_seen.update(kept_ids)
        self._val_detections += predictions_to_coco(
            outputs, kept_ids, self.eval_info["label_to_cat_id"]
        )

    def on_validation_epoch_end(self) -> None:
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
            self.eval_info["coco_gt"], detections, class_names=self.eval_info.get("class_names"),
            image_ids=seen_ids,
        )
        self.last_metrics = metrics
        self.metrics_step = self.global_step
        scalars = {f"val/{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.log_dict(scalars, sync_dist=False, rank_zero_only=True)
        self.log("AP", float(metrics["AP"]), prog_bar=True, logger=False, rank_zero_only=True)

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["structkd"] = {
            "spec": self.spec.to_dict(),
            "class_names": list(self.eval_info.get("class_names_list", [])),
            "distill": {
                "distance": self.distill_cfg.distance, "weight": self.distill_cfg.weight,
            } if isinstance(self.net, Distiller) else None,
        }
