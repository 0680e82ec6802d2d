"""The run's option types: optimiser, learning-rate schedule, data loading, trainer.

Each is the one place its names, types, defaults and value checks are written: ``fit`` takes
their fields as keyword options, the LightningModule, the DataModule and the Trainer factory take
the objects, and the YAML sections ``optim``, ``schedule``, ``data`` (loader part) and
``trainer`` are these classes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..distill import DEFAULT_RATIO

__all__ = ["SCHEDULE_PRESETS", "Balance", "Loader", "Optim", "Schedule", "TrainerOptions"]

# mmdetection's schedules: epochs and the epochs where the learning rate drops 10x.
SCHEDULE_PRESETS: dict[str, tuple[int, tuple[float, ...]]] = {"1x": (12, (8, 11)),
                                                              "2x": (24, (16, 22))}


def _number(name: str, value: float, *, low: float = 0.0, strict: bool = False,
            high: float | None = None) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
        raise ValueError(f"{name}={value!r}; expected a finite number {bound}")


def _count(name: str, value: int | None, *, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}; expected an int >= {low}"
                         + (" or null" if optional else ""))


@dataclass
class Optim:
    """The optimiser: ``name`` "sgd" (with ``momentum``) or "adamw"; ``grad_clip`` is the
    gradient norm clip (None: off)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float | None = 10.0

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ValueError(f"name={self.name!r}; expected one of ['sgd', 'adamw']")
        _number("lr", self.lr, strict=True)
        _number("momentum", self.momentum)
        _number("weight_decay", self.weight_decay)
        if self.grad_clip is not None:
            _number("grad_clip", self.grad_clip, strict=True)

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class Schedule:
    """Epoch-based step schedule with linear warm-up: the rate is multiplied by ``gamma`` at
    each milestone (an epoch; fractions allowed: 0.75 is three quarters into the first epoch).
    ``preset`` "1x" (12 epochs, drops at 8 and 11) or "2x" (24; 16, 22), mmdetection's, sets
    ``epochs`` and ``milestones``. ``max_steps`` stops early (smoke runs); the schedule still
    spans ``epochs``."""

    preset: Literal["1x", "2x"] | None = None
    epochs: int = 12
    milestones: list[float] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in SCHEDULE_PRESETS:
                raise ValueError(f"preset={self.preset!r}; expected one of "
                                 f"{sorted(SCHEDULE_PRESETS)} or null")
            epochs, milestones = SCHEDULE_PRESETS[self.preset]
            self.epochs, self.milestones = epochs, list(milestones)
        _count("epochs", self.epochs, low=1)
        self.milestones = list(self.milestones)
        for m in self.milestones:
            _number("milestones", m)
        _number("gamma", self.gamma, strict=True)
        _count("warmup_iters", self.warmup_iters, low=0)
        _number("warmup_ratio", self.warmup_ratio, high=1.0)
        _count("max_steps", self.max_steps, low=1, optional=True)

    def factor(self, step: int, steps_per_epoch: float) -> float:
        """The learning-rate multiplier at optimiser step ``step``: linear warm-up, then a step
        decay by ``gamma`` at each milestone (no decay while the epoch length is unknown)."""
        warm = 1.0
        if step < self.warmup_iters:
            warm = self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_iters
        epoch = step / steps_per_epoch if math.isfinite(steps_per_epoch) else 0.0
        return warm * self.gamma ** sum(epoch >= m for m in self.milestones)


@dataclass
class Loader:
    """Data loading: batch sizes, loader worker processes, and ``limit_*`` to use only the
    first N images of a split (smoke runs)."""

    batch_size: int = 4
    val_batch_size: int = 8
    num_workers: int = 2
    persistent_workers: bool = False  # keep loader workers alive between epochs
    limit_train: int | None = None
    limit_val: int | None = None

    def __post_init__(self) -> None:
        _count("batch_size", self.batch_size, low=1)
        _count("val_batch_size", self.val_batch_size, low=1)
        _count("num_workers", self.num_workers, low=0)
        _count("limit_train", self.limit_train, low=1, optional=True)
        _count("limit_val", self.limit_val, low=1, optional=True)


@dataclass
class TrainerOptions:
    """The run itself: where it writes (``out_dir``), Lightning's device settings
    (``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ``precision``), the seed, how
    often to validate / log / checkpoint, resuming (``resume``: "last" or a checkpoint path),
    CPU ``threads`` per process, ``overwrite`` (replace a run already in ``out_dir``; else a
    fresh ``out_dir-2``, ...), and the divergence guard's ``divergence_factor`` (stop when the
    loss exceeds this many times its running median)."""

    out_dir: str = "runs/experiment"
    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | int = "32-true"
    seed: int = 0
    deterministic: bool = False
    val_every: int = 1  # epochs; 0: only the final validation
    log_every: int = 10  # steps
    checkpoint_every: int = 1  # epochs
    progress: bool = True
    resume: str | None = None
    threads: int | None = None
    overwrite: bool = False
    divergence_factor: float = 100.0

    def __post_init__(self) -> None:
        _count("num_nodes", self.num_nodes, low=1)
        _count("seed", self.seed, low=0)
        _count("val_every", self.val_every, low=0)
        _count("log_every", self.log_every, low=1)
        _count("checkpoint_every", self.checkpoint_every, low=1)
        _count("threads", self.threads, low=1, optional=True)
        _number("divergence_factor", self.divergence_factor)


@dataclass
class Balance:
    """How the distillation term is weighted and watched (the ``distill`` section's other keys).

    ``weight: auto`` sets the method's weight before the first step so that the distillation
    gradient's norm on the student parameters both losses reach is ``auto_ratio`` times the
    detection gradient's, averaged over ``auto_batches`` batches of the untrained student;
    ``auto_every`` > 0 measures again every that many steps and moves the weight halfway (in
    log scale) toward the ratio again (gradient-norm balancing during training).
    ``watch_every``: log the gradient-norm ratio every that many steps (0: never);
    ``watch_stall``: warn when the term stays at 0 or constant for that many steps (0: never);
    ``watch_band``: warn when the ratio leaves ``[low, high]``.
    """

    auto_ratio: float = DEFAULT_RATIO
    auto_batches: int = 4
    auto_every: int = 0
    watch_every: int = 50
    watch_stall: int = 100
    watch_band: list[float] = field(default_factory=lambda: [0.01, 100.0])

    def __post_init__(self) -> None:
        _number("auto_ratio", self.auto_ratio, strict=True)
        _count("auto_batches", self.auto_batches, low=1)
        _count("auto_every", self.auto_every, low=0)
        _count("watch_every", self.watch_every, low=0)
        _count("watch_stall", self.watch_stall, low=0)
        band = list(self.watch_band)
        if len(band) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                     and math.isfinite(v) and v >= 0 for v in band) \
                or band[0] >= band[1]:
            raise ValueError(f"watch_band={self.watch_band!r}; expected [low, high] with "
                             "0 <= low < high")
        self.watch_band = [float(v) for v in band]

    @property
    def grad_every(self) -> int:
        """Steps between gradient-norm measurements (0: none): both uses share them."""
        every = [n for n in (self.auto_every, self.watch_every) if n]
        return math.gcd(*every) if every else 0
