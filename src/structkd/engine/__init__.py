"""Training engine on Lightning: ``fit`` and ``evaluate`` on objects, the config path over them,
and the standard pieces (DataModule, LightningModule, Trainer factory) for your own Trainer."""

from .cache_config import open_teacher_cache
from .evaluate import evaluate
from .fit import OPTIONS, fit
from .from_config import build_run, cache_teacher, evaluate_checkpoint, load_teacher, run_config
from .monitor.distill_start import DistillStart
from .monitor.distill_watch import DistillWatch
from .options import Balance, Loader, Optim, Schedule, TrainerOptions
from .recipe import Config, TeacherSource, load_config
from .runs.results import RunResult
from .runs.run_dir import check_out_dir, holds_run, next_free
from .training.datamodule import DetectionDataModule
from .training.evalinfo import EvalInfo, eval_info_for
from .training.module import DetectionModule
from .training.trainer import build_trainer

__all__ = [
    "OPTIONS",
    "Balance",
    "Config",
    "DetectionDataModule",
    "DetectionModule",
    "DistillStart",
    "DistillWatch",
    "EvalInfo",
    "Loader",
    "Optim",
    "RunResult",
    "Schedule",
    "TeacherSource",
    "TrainerOptions",
    "build_run",
    "build_trainer",
    "cache_teacher",
    "check_out_dir",
    "eval_info_for",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "holds_run",
    "load_config",
    "load_teacher",
    "next_free",
    "open_teacher_cache",
    "run_config",
]
