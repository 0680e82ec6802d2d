"""Lightning callbacks with one job each: stop a diverging run, never save a broken state."""

from __future__ import annotations

import logging
import statistics
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

logger = logging.getLogger("structkd.engine")


class DivergenceGuard(L.Callback):
    """Stops the run before a bad step is applied: a non-finite loss, or one that explodes to
    more than ``factor`` times its level. The level is the median of the last ``window`` steps
    once ``min_steps`` are known, and before that the largest loss seen so far, so an absurd
    value is caught from the second step on (a non-finite one from the first).

    Every rank takes part in the decision, so under DDP all of them stop together instead of
    one raising while the others wait in the next collective.
    """

    def __init__(self, factor: float = 100.0, window: int = 50, min_steps: int = 20) -> None:
        self.factor, self.min_steps = factor, min_steps
        self.history: deque[float] = deque(maxlen=window)

    def _problem(self, value: float) -> str | None:
        if not torch.isfinite(torch.tensor(value)):
            return "non-finite loss"
        if self.factor and self.history:
            if len(self.history) >= self.min_steps:
                level, what = statistics.median(self.history), "the median"
            else:
                level, what = max(self.history), "the largest loss"
            if level > 0 and value > self.factor * level:
                return (f"exploding loss ({value:.4g}, more than {self.factor:g}x {what} "
                        f"{level:.4g} of the last {len(self.history)} steps)")
        return None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss: torch.Tensor) -> None:
        value = float(loss.detach())  # the one host synchronisation per step
        problem = self._problem(value)
        stop = trainer.strategy.reduce_boolean_decision(problem is not None, all=False)
        if not stop:
            self.history.append(value)
            return
        terms = {k: round(float(v), 6) for k, v in getattr(pl_module, "last_losses", {}).items()}
        reason = problem or "another process saw a non-finite or exploding loss"
        ckpt = _last_checkpoint(trainer)
        kept = (f"the last checkpoint, {ckpt[0]}, holds step {ckpt[1]} (every step up to it "
                "passed this check) and is kept" if ckpt is not None else
                "no checkpoint had been written yet")
        raise FloatingPointError(
            f"{reason} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"terms {terms}; the step was not applied and {kept}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state_dict.get("history", []))


def _last_checkpoint(trainer: L.Trainer) -> tuple[Path, int] | None:
    """The rolling checkpoint and the step it holds, or None before the first one."""
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "dirpath", None):
        return None
    path = Path(cb.dirpath) / "last.ckpt"
    if not path.is_file():
        return None
    step = getattr(cb, "saved_step", None)
    if step is None:  # written by an earlier process of this run: read its step
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step = int(ckpt.get("global_step", -1))
    return path, step


class SafeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that refuses to write weights holding NaN or Inf (the previous,
    good checkpoint stays), and that saves an epoch's state as soon as its training batches are
    done, before validation runs: a validation that fails (a bad image, a full disk) loses no
    training (resuming from it is exact; the validation runs again)."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or not self.dirpath:
            return
        if (trainer.current_epoch + 1) % max(1, self._every_n_epochs or 1):
            return
        filepath = self.format_checkpoint_name(self._monitor_candidates(trainer))
        self._save_checkpoint(trainer, filepath)

    saved_step: int | None = None  # the step of the checkpoint this process last wrote

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module
        bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            logger.error("not saving %s: parameters %s hold NaN or Inf", filepath, bad[:3])
            return
        super()._save_checkpoint(trainer, filepath)
        self.saved_step = trainer.global_step
