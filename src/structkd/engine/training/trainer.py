"""The Lightning ``Trainer`` of a structkd run: its callbacks, loggers and run-folder files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger

from ..options import Optim, Schedule, TrainerOptions
from ..runs.run_dir import csv_logger, open_csv_logger
from .callbacks import DivergenceGuard, SafeCheckpoint

__all__ = ["build_trainer"]


def build_trainer(out_dir: Path, options: TrainerOptions, schedule: Schedule, optim: Optim,
                  callbacks: Sequence[L.Callback] = (), *,
                  resume_step: int | None = None) -> L.Trainer:
    """One trainer for fitting and the final validation, so both log into the same CSV and
    TensorBoard files (a second trainer would start them afresh and lose the curves).

    It keeps one rolling checkpoint, ``checkpoints/last.ckpt``, written every
    ``checkpoint_every`` epochs as soon as the epoch's training ends, and stops a diverging run
    (:class:`~structkd.engine.training.callbacks.DivergenceGuard`). ``resume_step``: the step
    of the checkpoint a resumed run starts from (its CSV log drops the rows it redoes).
    """
    t, s = options, schedule
    ckpt = SafeCheckpoint(dirpath=out_dir / "checkpoints", filename="last", save_top_k=1,
                          enable_version_counter=False, every_n_epochs=t.checkpoint_every,
                          save_on_train_epoch_end=True)
    csv_log = csv_logger(out_dir)
    loggers = [csv_log, TensorBoardLogger(out_dir, name="tb", version="")]
    try:
        trainer = L.Trainer(
            max_epochs=s.epochs, max_steps=s.max_steps or -1, accelerator=t.accelerator,
            devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
            gradient_clip_val=optim.grad_clip, deterministic=t.deterministic,
            # val_every=0: no validation while fitting (the final one still runs).
            check_val_every_n_epoch=t.val_every if t.val_every > 0 else s.epochs + 1,
            log_every_n_steps=t.log_every,
            enable_progress_bar=t.progress, use_distributed_sampler=False, default_root_dir=out_dir,
            num_sanity_val_steps=0, enable_model_summary=False,
            callbacks=[ckpt, DivergenceGuard(factor=t.divergence_factor), *callbacks],
            logger=loggers,
        )
    except (MisconfigurationException, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(_refused(e, options)) from e
    if trainer.is_global_zero:
        open_csv_logger(csv_log, out_dir, resume_step=resume_step)
    return trainer


def _refused(e: BaseException, options: TrainerOptions) -> str:
    """Lightning's refusal of the accelerator settings, naming the ``trainer.*`` values (its
    own message names none of our keys) and what would work."""
    shown = [f"trainer.accelerator={options.accelerator!r}", f"trainer.devices={options.devices!r}"]
    shown += [f"trainer.{k}={getattr(options, k)!r}" for k, default in
              (("strategy", "auto"), ("precision", "32-true"), ("num_nodes", 1))
              if getattr(options, k) not in (default, None)]
    hint = "expected e.g. trainer.accelerator=auto|cpu|gpu, trainer.devices=auto|1|[0,1]"
    if str(options.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        hint = ("no usable CUDA GPU on this machine, torch.cuda.is_available() is False: use "
                "trainer.accelerator=cpu or auto")
    return (f"Lightning cannot set up the trainer with {', '.join(shown)}: "
            f"{' '.join(str(e).split())} ({hint})")
