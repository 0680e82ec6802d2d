"""Before the first step of a distillation run: prove the distillation is on, then measure an
``auto`` weight. A Lightning callback with that one job.

Both use the first training batches of the run's own loader, on the run's device; neither
leaves a trace (the student's statistics and every random state are restored), so a run with
the checks is the run without them. Under DDP the gradient norms are averaged over the ranks, so
every rank sets the same weight. The chosen weight is saved with the callback's state in every
checkpoint and restored on resume (never measured again on a half-trained student).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from ...distill import Distiller, calibrate_weight, check_distillation
from ..options import Balance
from ..runs.resume import rng_states, set_rng_states

logger = logging.getLogger("structkd.engine")

__all__ = ["DistillStart"]


def first_batches(trainer: L.Trainer, pl_module: L.LightningModule, n: int) -> list[Any]:
    """The first ``n`` batches of the run's training loader, on the module's device."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        raise ValueError("the distillation start-up checks read the first batches from the "
                         "trainer's datamodule; pass datamodule=DetectionDataModule(...) to fit")
    loader = datamodule.train_dataloader()
    batches = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        batches.append(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))
    del loader
    return batches


class DistillStart(L.Callback):
    """Checks the distillation on the first batch (:func:`structkd.distill.check_distillation`)
    and, for ``weight: auto``, calibrates the weight (``balance.auto_ratio`` over
    ``balance.auto_batches`` batches). ``calibration`` holds what was measured."""

    def __init__(self, balance: Balance | None = None) -> None:
        self.balance = balance or Balance()
        self.calibration: dict[str, Any] | None = None
        self.check: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = getattr(pl_module, "net", None)
        if not isinstance(net, Distiller):
            return
        if self._restored is not None:  # resumed: the module restored the checkpoint's weight
            self.calibration = self._restored.get("calibration")
            if net.auto_weight and not net.auto_weight_set:
                raise ValueError("the checkpoint of this weight='auto' run holds no weight; "
                                 "start the run afresh")
            return
        states = rng_states()
        try:
            count = self.balance.auto_batches if net.auto_weight else 1
            batches = first_batches(trainer, pl_module, count)
            if not batches:
                raise ValueError("the training loader yielded no batch; cannot check the "
                                 "distillation")
            self.check = check_distillation(net, *batches[0])
            logger.info("distillation checked on the first batch: term %.4g (weight %s), "
                        "gradient norm %.4g on the student's %s", self.check["term"],
                        "1, before calibration" if net.auto_weight else f"{net.weight:g}",
                        self.check["grad_norm"], ", ".join(self.check["reached_groups"]))
            if net.auto_weight:
                cal = calibrate_weight(net, batches, ratio=self.balance.auto_ratio,
                                       reduce=lambda v: trainer.strategy.reduce(
                                           v, reduce_op="mean"))
                self.calibration = cal.to_dict()
                logger.info(
                    "weight auto: %.4g (|g_detection| %.4g, |g_distill| at weight 1 %.4g on %d "
                    "batch(es); target ratio %g)", cal.weight, cal.detection_norm,
                    cal.unit_distill_norm, cal.batches, cal.ratio)
        finally:
            set_rng_states(states)
