"""Run by tests/test_runs.py: two DDP processes on CPU; rank 1 alone gets a NaN loss at its
second step. Lightning's "ddp" strategy starts rank 1 by running this script again, so the
patch below applies on both ranks."""

from __future__ import annotations

import sys
from pathlib import Path

from kdtest import tiny_overrides, train
from structkd.data import SyntheticPaths
from structkd.engine.training.module import DetectionModule
from structkd.recipes import load_config

original = DetectionModule.training_step


def poisoned(self, batch, batch_idx):
    loss = original(self, batch, batch_idx)
    if self.trainer.global_rank == 1 and self.global_step == 1:
        return loss * float("nan")
    return loss


DetectionModule.training_step = poisoned

if __name__ == "__main__":
    out, data_root = Path(sys.argv[1]), Path(sys.argv[2])
    paths = SyntheticPaths.under(data_root)
    train(load_config(overrides=tiny_overrides(
        paths, out, "trainer.strategy=ddp", "trainer.devices=2", "schedule.max_steps=4",
        "data.batch_size=2")))
