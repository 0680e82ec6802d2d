"""The Lightning module: a ``Distiller`` (or a plain detector) wired to optimiser and evaluation.

Lightning owns devices, DDP, precision, checkpoints and logging; this module only says what a
training step, a validation pass and the optimiser are, and what a checkpoint carries besides
the weights: the run's identity (method, options, levels, teacher fingerprint) and every RNG.
It runs under any ``lightning.Trainer``; with a :class:`DetectionDataModule` it finds the
validation ground truth itself.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from ...distill import DetectorLosses, Distiller
from ...evaluation import coco_metrics, predictions_to_coco
from ..options import Optim, Schedule
from ..runs.resume import rng_states, set_rng_states
from .evalinfo import EvalInfo

__all__ = ["DetectionModule"]


class DetectionModule(L.LightningModule):
    """Trains ``net`` (a ``Distiller`` or ``DetectorLosses``) and evaluates its student.

    Args:
        net: what computes a step's loss dict (``Distiller(student, teacher, "ssim")``, or
            ``DetectorLosses(detector)`` for plain training).
        optim, schedule: the optimiser and the learning-rate schedule (a step schedule by
            epoch, stepped every optimiser step).
        eval_info: the validation ground truth; None takes it from the trainer's
            ``DetectionDataModule`` (no evaluation without either).
        run_meta: what identifies the run (spec, labels, method, options, levels, teacher
            fingerprint); saved in every checkpoint under ``"structkd"`` with the RNG states.

    After validation, ``last_metrics`` holds the COCO metrics; ``step_times`` the wall time of
    every training step.
    """

    def __init__(
        self, net: Distiller | DetectorLosses, *, optim: Optim | None = None,
        schedule: Schedule | None = None, eval_info: EvalInfo | None = None,
        run_meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optim = optim or Optim()
        self.schedule = schedule or Schedule()
        self.eval_info = eval_info
        self.run_meta = dict(run_meta or {})
        self.resumed_meta: dict[str, Any] | None = None
        self._val_detections: list[dict[str, Any]] = []
        self._val_seen: set[int] = set()
        self.step_times: list[float] = []
        self._t0: float | None = None
        self.last_metrics: dict[str, Any] = {}
        self.metrics_step: int | None = None  # global step at which last_metrics were measured
        self.last_losses: dict[str, torch.Tensor] = {}

    @property
    def student(self) -> nn.Module:
        return self.net.student

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.eval_info is None and hasattr(datamodule, "eval_info"):
            self.eval_info = datamodule.eval_info()

    # ---- training -------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """After a resume, the optimiser and its schedule follow the options of now: a changed
        rate, momentum, weight decay or schedule applies from the resumed step on (Lightning
        restored the checkpoint's; unchanged values are left exactly as restored)."""
        saved = (self.resumed_meta or {}).get("options")
        now = self.run_meta.get("options")
        if not saved or not now:
            return
        changed = [k for k in now if k.split(".")[0] in ("optim", "schedule")
                   and k in saved and saved[k] != now[k]]
        if not changed:
            return
        opt = self.optimizers(use_pl_optimizer=False)
        sched = self.lr_schedulers()
        nb = self.trainer.num_training_batches
        steps_per_epoch = nb if isinstance(nb, int | float) and nb > 0 else math.inf
        factor = self.schedule.factor(sched.last_epoch, steps_per_epoch)
        for group in opt.param_groups:
            group["initial_lr"] = self.optim.lr
            group["lr"] = self.optim.lr * factor
            group["weight_decay"] = self.optim.weight_decay
            if "momentum" in group:
                group["momentum"] = self.optim.momentum
        sched.base_lrs = [self.optim.lr] * len(opt.param_groups)

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
        opt = self.optim.build([p for p in self.net.parameters() if p.requires_grad])
        trainer, schedule = self.trainer, self.schedule

        def factor(step: int) -> float:
            nb = trainer.num_training_batches
            steps_per_epoch = nb if isinstance(nb, int | float) and nb > 0 else math.inf
            return schedule.factor(step, steps_per_epoch)

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
        if isinstance(self.net, Distiller):  # a calibrated or adapted weight is the run's own
            checkpoint["structkd"]["distill_weight"] = self.net.weight

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("structkd")
        if not isinstance(meta, dict):
            raise ValueError("the checkpoint is not one of a structkd run (no 'structkd' entry)")
        self.resumed_meta = meta
        if "rng" in meta:
            set_rng_states(meta["rng"])
        if isinstance(self.net, Distiller) and "distill_weight" in meta:
            self.net.set_weight(float(meta["distill_weight"]))
