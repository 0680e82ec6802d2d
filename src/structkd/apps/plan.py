"""The built-in study's plan (data, teacher, student, methods) and its cached runs.

A plan is plain data; ``ensure_teacher`` and ``run_student`` turn a part of it into a ``Config``
and run it through the same API a user calls (``structkd.recipes.run_config``), reusing a run
only when its saved config equals the planned one. How the plan was chosen (the candidates and
their AP): ``docs/plan_candidates.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from .._version import __version__
from ..data import SyntheticPaths
from ..engine import Balance, RunResult, holds_run
from ..recipes import Config, load_config, run_config

logger = logging.getLogger("structkd.demo")


@dataclass
class Plan:
    """Everything that defines a study: data, teacher and student configs, methods."""

    data: dict[str, Any]
    teacher: dict[str, Any]
    student: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    demo_methods: tuple[str, ...] = ("none", "mse", "ssim")
    study_methods: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


# Study rows: a name -> the distill section. "matched" weights are set by the study's
# calibration so that the term has SSIM's size at the start of training (see study.py);
# "auto" weights by each run itself (gradient-norm ratio, structkd.distill.calibrate_weight).
ROWS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "l1": {"method": "l1", "weight": 2.0},
    "mse": {"method": "mse", "weight": 2.0},
    "ssim": {"method": "ssim", "weight": 2.0},
    "ssim_s": {"method": "ssim", "weight": 2.0, "options": {"components": [0.0, 0.0, 1.0]}},
    "ssim_cs": {"method": "ssim", "weight": 2.0, "options": {"components": [0.0, 1.0, 1.0]}},
    "ssim_w1": {"method": "ssim", "weight": 1.0},
    "ssim_w4": {"method": "ssim", "weight": 4.0},
    "mse_matched": {"method": "mse", "weight": "matched"},
    "pkd": {"method": "pkd"},
    "pkd_matched": {"method": "pkd", "weight": "matched"},
    "cwd": {"method": "cwd"},
    "cwd_matched": {"method": "cwd", "weight": "matched"},
    "mgd": {"method": "mgd"},
    "mgd_matched": {"method": "mgd", "weight": "matched"},
    "fgd": {"method": "fgd"},
    "fgd_matched": {"method": "fgd", "weight": "matched"},
    **{f"{m}_auto": {"method": m, "weight": "auto"} for m in ("mse", "ssim", "pkd", "cwd",
                                                               "mgd", "fgd")},
    # head-level methods (FCOS heads: no box distributions, so no LD)
    "scoreweighted": {"method": "scoreweighted"},
    "bckd": {"method": "bckd"},
    "crosskd": {"method": "crosskd"},
    **{f"{m}_auto": {"method": m, "weight": "auto"} for m in ("scoreweighted", "bckd",
                                                               "crosskd")},
    # the best feature method of the study above with a head method, each at its own weight
    "mgd+bckd": {"method": "mgd+bckd"},
}

STUDY_METHODS = ("none", "mse", "mse_matched", "mse_auto", "ssim", "ssim_auto", "pkd",
                 "pkd_matched", "pkd_auto", "cwd", "cwd_matched", "cwd_auto", "mgd",
                 "mgd_matched", "mgd_auto", "fgd", "fgd_matched", "fgd_auto")

# The generator's "easier" setting at the detectors' input size (128 px, nothing is resized):
# at most 5 objects, at most 35% of an object hidden, at most 5 clutter items, fewer small
# objects; many distinct images passed over once or twice rather than many epochs of a few.
_SYNTHETIC = {"num_train": 2600, "num_val": 128, "image_size": 128, "max_objects": 5,
              "max_occlusion": 0.35, "clutter": 5, "size_probs": [0.2, 0.5, 0.3]}
_DATA = {"synthetic": _SYNTHETIC, "num_workers": 1, "batch_size": 4, "val_batch_size": 8}
_OPTIM = {"name": "adamw", "lr": 3e-4, "weight_decay": 0.05, "grad_clip": 10.0}
_STUDENT_OPTIM = {**_OPTIM, "lr": 1e-3}  # the MobileNet student's short run gains from it
# Teacher FCOS ResNet-18 FPN-128, student FCOS MobileNetV3-Large FPN-64: 0.27x the parameters.
_TEACHER_MODEL = {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 128, "min_size": 128,
                  "max_size": 128}
_STUDENT_MODEL = {"arch": "fcos", "backbone": "mobilenet_v3_large", "fpn_channels": 64,
                  "min_size": 128, "max_size": 128}

# The paper's regime: a bigger teacher trained longer, a short student schedule; both drop
# their learning rate 10x for the last fifth of training.
DEFAULT_PLAN = Plan(
    data=_DATA,
    teacher={"model": _TEACHER_MODEL, "optim": _OPTIM,
             "schedule": {"epochs": 2, "milestones": [1.6], "warmup_iters": 100}},
    student={"model": _STUDENT_MODEL, "optim": _STUDENT_OPTIM, "data": {"limit_train": 2000},
             "schedule": {"epochs": 1, "milestones": [0.8], "warmup_iters": 100}},
    methods=ROWS, study_methods=STUDY_METHODS,
    notes=["Teacher: FCOS ResNet-18 FPN-128 at 128 px, two passes over the 2600 generated "
           "training images; students: FCOS MobileNetV3-Large FPN-64, one pass over the first "
           "2000 (learning rate x0.1 for the last fifth of each), one seed. "
           "`structkd benchmark` repeats the students over seeds."],
)

_TINY_TEACHER = {**_TEACHER_MODEL, "fpn_channels": 64}
_TINY_STUDENT = {**_STUDENT_MODEL, "fpn_channels": 32}
QUICK_PLAN = Plan(
    data={**_DATA, "synthetic": {**_SYNTHETIC, "num_train": 48, "num_val": 16},
          "num_workers": 0},
    teacher={"model": _TINY_TEACHER, "optim": _OPTIM,
             "schedule": {"epochs": 2, "milestones": [], "warmup_iters": 10}},
    student={"model": _TINY_STUDENT, "optim": _OPTIM,
             "schedule": {"epochs": 1, "milestones": [], "warmup_iters": 5}},
    methods=ROWS, study_methods=STUDY_METHODS,
    notes=["--quick: a smoke run on 48 images; its numbers say nothing about the method."],
)


def get_plan(quick: bool) -> Plan:
    return QUICK_PLAN if quick else DEFAULT_PLAN


def synthetic(cache: Path) -> SyntheticPaths:
    """Where the plans' generated dataset lives in the cache."""
    return SyntheticPaths.under(cache / "synthetic")


def _data(plan_part: dict[str, Any], data: dict[str, Any],
          cache: Path | None = None) -> dict[str, Any]:
    """The data section of a plan part: the plan's data, narrowed by the part (the students'
    ``limit_train``: a shorter pass over the teacher's images); the dataset is always the
    plan's, generated under ``cache``."""
    out = {**data, **plan_part.get("data", {})}
    out["synthetic"] = dict(data["synthetic"])
    if cache is not None:
        out["synthetic"]["root"] = str(synthetic(cache).root)
    return out


def section(plan_part: dict[str, Any], data: dict[str, Any], cache: Path, out_dir: Path,
            seed: int, overrides: Sequence[str]) -> Config:
    """The ``Config`` of one run of the plan (the demo owns its folders: it overwrites them)."""
    base = {**plan_part, "data": _data(plan_part, data, cache)}
    base["trainer"] = {"out_dir": str(out_dir), "seed": seed, "val_every": 0,
                       "checkpoint_every": 1, "overwrite": True}
    return load_config(base=base, overrides=list(overrides))


def run_key(cfg: Config) -> str:
    """A hash of what defines a run's result (not where it is written)."""
    d = cfg.to_dict()
    d["trainer"] = {k: v for k, v in d["trainer"].items() if k in ("seed", "precision")}
    # A teacher of another family by name: left out at its defaults, so runs cached before
    # these keys existed stay valid.
    for k, default in (("family", None), ("name", None), ("options", {}),
                       ("allow_untrained", False)):
        if d["teacher"].get(k, default) == default:
            d["teacher"].pop(k, None)
    if d["distill"]["method"] == "none":
        # How a distillation is weighted and watched, and a teacher cache, never change a plain
        # run (the teachers'): left out, so teachers cached before these keys existed stay valid.
        for name in [f.name for f in dataclasses.fields(Balance)] + ["teacher_device"]:
            d["distill"].pop(name, None)
        for k in ("cache", "cache_dtype"):
            d["teacher"].pop(k, None)
    text = json.dumps([d, __version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def teacher_config(plan: Plan, cache: Path, overrides: Sequence[str]) -> Config:
    cfg = section(plan.teacher, plan.data, cache, cache / "teachers", 0, overrides)
    cfg.distill.method = "none"
    cfg.trainer.out_dir = str(cache / "teachers" / run_key(cfg))  # the key leaves out_dir out
    return cfg


def cached_teacher(plan: Plan, cache: Path, overrides: Sequence[str]) -> Path | None:
    out = Path(teacher_config(plan, cache, overrides).trainer.out_dir)
    done = (out / "results.json").is_file() and (out / "student.safetensors").is_file()
    return out if done else None


def ensure_teacher(plan: Plan, cache: Path, overrides: Sequence[str],
                   callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Train the plan's teacher unless an identical one is cached."""
    cfg = teacher_config(plan, cache, overrides)
    out = Path(cfg.trainer.out_dir)
    if cached_teacher(plan, cache, overrides):
        logger.info("teacher: reusing the cached teacher in %s", out)
        return RunResult.load(out)
    if holds_run(out):  # the cache's own folder for this config (section() overwrites it)
        logger.warning("teacher: %s holds an interrupted training of this teacher; training "
                       "it again from the start", out)
    logger.info("teacher: training %s/%s into %s (cached for later runs)",
                cfg.model.arch, cfg.model.backbone, out)
    return run_config(cfg, callbacks=callbacks)


def student_config(plan: Plan, distill: dict[str, Any], teacher: Path, cache: Path,
                   out_dir: Path, seed: int, overrides: Sequence[str]) -> Config:
    part = {**plan.student, "distill": distill, "teacher": {"checkpoint": str(teacher)}}
    return section(part, plan.data, cache, out_dir, seed, overrides)


def run_student(plan: Plan, distill: dict[str, Any], teacher: Path, cache: Path, out_dir: Path,
                seed: int, overrides: Sequence[str], *,
                callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Train one student with the ``distill`` section (``out_dir``: where the run goes: the
    plan's runs replace what their folder holds, see :func:`section`; with
    ``trainer.overwrite=false`` set, a numbered ``<out_dir>-2``). The study reuses and resumes
    its runs through ``structkd.comparison.run_row``."""
    return run_config(student_config(plan, distill, teacher, cache, out_dir, seed, overrides),
                      callbacks=callbacks)


def train_steps(plan_part: dict[str, Any], data: dict[str, Any]) -> int:
    """Optimiser steps of one run of the plan (for the job's progress bar)."""
    cfg = load_config(base={**plan_part, "data": _data(plan_part, data)})
    images = cfg.data.synthetic.num_train
    if cfg.data.limit_train:
        images = min(cfg.data.limit_train, images)
    steps = -(-images // cfg.data.batch_size) * cfg.schedule.epochs
    return min(steps, cfg.schedule.max_steps) if cfg.schedule.max_steps else steps
