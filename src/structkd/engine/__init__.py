"""Training engine on Lightning: ``fit`` and ``evaluate`` on objects (their option types in
:mod:`.options`), and the standard pieces (DataModule, LightningModule, Trainer factory) for
your own Trainer. The YAML path over it is :mod:`structkd.recipes`."""

from .evaluate import evaluate
from .fit import OPTIONS, fit
from .monitor.distill_start import DistillStart
from .monitor.distill_watch import DistillWatch
from .options import Balance, Loader, Optim, Schedule, TrainerOptions
from .runs.results import RunResult
from .runs.run_dir import check_out_dir, holds_run, next_free
from .training.datamodule import DetectionDataModule
from .training.evalinfo import EvalInfo, eval_info_for
from .training.module import DetectionModule
from .training.trainer import build_trainer

__all__ = [
    "OPTIONS",
    "Balance",
    "DetectionDataModule",
    "DetectionModule",
    "DistillStart",
    "DistillWatch",
    "EvalInfo",
    "Loader",
    "Optim",
    "RunResult",
    "Schedule",
    "TrainerOptions",
    "build_trainer",
    "check_out_dir",
    "eval_info_for",
    "evaluate",
    "fit",
    "holds_run",
    "next_free",
]
