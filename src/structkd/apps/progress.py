"""One progress bar over every training step of a multi-run job, with its ETA."""

from __future__ import annotations

from typing import Any

import lightning as L
from tqdm.auto import tqdm


class JobProgress(L.Callback):
    """A tqdm bar over the steps of several runs (a teacher and its students): the ETA is that
    of the whole job, not of the current epoch. ``stage`` names the run in progress."""

    def __init__(self, total_steps: int, desc: str = "demo") -> None:
        self.bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)
        self.stage = ""

    def begin(self, stage: str) -> JobProgress:
        self.stage = stage
        self.bar.set_postfix_str(stage)
        return self

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
