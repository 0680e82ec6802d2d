"""Training engine on Lightning: ``fit`` on objects, and the config path over it."""

from .fit import RunResult, fit, run
from .from_config import distill, evaluate, load_teacher, run_config, train
from .module import DetectionModule, EvalInfo, lr_factor

__all__ = [
    "DetectionModule", "EvalInfo", "RunResult", "distill", "evaluate", "fit", "load_teacher",
    "lr_factor", "run", "run_config", "train",
]
