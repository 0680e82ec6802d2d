"""Experiment configuration: one YAML file per run, ``--set key=value`` overrides, strict keys.

Every section is a dataclass, so a typo in a key fails at load time with the list of valid keys
instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    """COCO annotation files and image folders; with no ``train_ann`` the built-in data is used."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    synthetic_root: str = "~/.cache/structkd/synthetic"
    synthetic_train: int = 512
    synthetic_val: int = 128
    synthetic_size: int = 256
    synthetic_seed: int = 0
    # Difficulty of the built-in data, passed to make_synthetic_coco: max_objects, max_occlusion,
    # clutter, size_probs (e.g. {max_objects: 4, max_occlusion: 0.4}); {} = the defaults.
    synthetic_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4
    val_batch_size: int = 8
    num_workers: int = 2
    hflip: float = 0.5
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    limit_train: int | None = None  # use only the first N training images (smoke runs)
    limit_val: int | None = None
    persistent_workers: bool = False  # keep loader workers alive between epochs


# The model section mirrors ``DetectorSpec`` field by field (its one source of truth); only the
# defaults below differ, sized for small inputs. ``num_classes`` comes from the data.
MODEL_DEFAULTS: dict[str, Any] = {
    "arch": "retinanet", "backbone": "resnet18", "fpn_channels": 128, "min_size": 256,
    "max_size": 256,
}


def _model_config_class() -> type:
    from .models.spec import DetectorSpec

    hints = typing.get_type_hints(DetectorSpec)
    fields = []
    for f in dataclasses.fields(DetectorSpec):
        if f.name == "num_classes":
            continue
        if f.name in MODEL_DEFAULTS:
            default = field(default=MODEL_DEFAULTS[f.name])
        elif f.default_factory is not dataclasses.MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field(default=f.default)
        fields.append((f.name, hints[f.name], default))
    cls = dataclasses.make_dataclass("ModelConfig", fields)
    cls.__module__ = __name__
    cls.__doc__ = ("The detector to train: the fields of ``structkd.models.DetectorSpec`` "
                   "(``num_classes`` comes from the data).")
    return cls


ModelConfig = _model_config_class()


@dataclass
class TeacherConfig:
    """Where the teacher comes from: one of ``checkpoint`` (a structkd export prefix, its
    ``.safetensors``, or a Lightning ``.ckpt`` of a structkd run) or ``torchvision`` (a builder
    name such as ``retinanet_resnet50_fpn_v2``) with ``weights`` (its weights enum, e.g.
    ``RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1``, read from the torch.hub cache, or a local
    ``.pth`` file of that builder's state dict)."""

    checkpoint: str | None = None
    torchvision: str | None = None
    weights: str | None = None
    num_classes: int | None = None  # torchvision builder without COCO weights only
    strict_classes: bool = True  # the teacher's label set must be the dataset's


@dataclass
class DistillConfig:
    """The distillation method (``structkd methods`` lists them with their options).

    ``method``: a method name or alias (ssim, l1, mse, pkd, cwd, mgd, fgd, ...) or "none";
    ``imports``: modules to import first, where your own ``@register_method`` classes live.
    ``weight``: the method's overall weight (None: its paper default). ``options``: the method's
    other options. ``student_layers`` / ``teacher_layers``: module path(s) to tap.
    """

    method: str = "ssim"
    weight: float | None = None
    imports: list[str] = field(default_factory=list)  # modules that register your own methods
    options: dict[str, Any] = field(default_factory=dict)
    levels: list[str] | None = None  # e.g. ["s8", "s16"]; None = every shared stride
    student_layers: Any = "backbone"  # a module path or a list of paths
    teacher_layers: Any = "backbone"
    teacher_root: str = "backbone"  # the teacher module that takes the batched images
    # The teacher's compute dtype: None follows the trainer's precision; "bfloat16" halves the
    # teacher's forward time on CPUs with native bf16 (features then differ by about 1%).
    teacher_dtype: str | None = None  # None | float32 | bfloat16 | float16

    def method_options(self) -> dict[str, Any]:
        """The keyword options for ``build_method``: ``options`` plus ``weight`` when set."""
        if "weight" in self.options:
            raise ValueError("distill.options.weight: set distill.weight instead")
        out = dict(self.options)
        if self.weight is not None:
            out["weight"] = self.weight
        return out


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float | None = 10.0


@dataclass
class ScheduleConfig:
    """Epoch-based step schedule with linear warm-up; presets follow mmdetection's 1x / 2x."""

    preset: str | None = None  # "1x" (12 epochs, drops at 8, 11) | "2x" (24; 16, 22)
    epochs: int = 12
    # Epochs (fractions allowed: 0.75 drops the rate after three quarters of the first epoch).
    milestones: list[float] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    max_steps: int | None = None  # stop early (smoke runs); the schedule still spans ``epochs``


@dataclass
class TrainerConfig:
    out_dir: str = "runs/experiment"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    seed: int = 0
    deterministic: bool = False
    val_every: int = 1  # epochs
    log_every: int = 10  # steps
    checkpoint_every: int = 1  # epochs
    progress: bool = True
    resume: str | None = None  # "last" or a checkpoint path
    threads: int | None = None  # torch CPU threads per process
    overwrite: bool = False  # replace a run already in out_dir (else a fresh out_dir-2, -3, ...)
    divergence_factor: float = 100.0  # stop when the loss exceeds this x its running median


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys of earlier versions, and where they went.
RENAMED = {"distill.distance": "distill.method", "distill.adapter": "distill.options.adapter"}
PRESETS = {"1x": (12, [8, 11]), "2x": (24, [16, 22])}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotated type (Optional, list, dict, Any, scalars)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}={value!r}: expected a list")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}={value!r}: expected a mapping")
        return dict(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{where}={value!r}: expected a finite number")
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads "1e-3" as a string; accept finite numbers written that way.
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ValueError(f"{where}={value!r}: expected {getattr(tp, '__name__', tp)}")


def _merge(obj: Any, data: dict[str, Any], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            hint = f" ('{path}' is now '{RENAMED[path]}')" if path in RENAMED else ""
            raise ValueError(f"unknown config key '{path}'{hint}; expected one of {names}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` (value in YAML syntax: 0.1, true, null, [1, 2])."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: cannot parse value: {e}") from e
    return key.strip().split("."), value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Build a Config from defaults, then ``base``, then a YAML file, then overrides."""
    cfg = Config()
    if base:
        _merge(cfg, base, "")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
        try:
            _merge(cfg, data, "")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, "")
    _finalise(cfg)
    return cfg


def _finalise(cfg: Config) -> None:
    s = cfg.schedule
    if s.preset is not None:
        if s.preset not in PRESETS:
            raise ValueError(f"schedule.preset={s.preset!r}; expected one of {sorted(PRESETS)}")
        s.epochs, s.milestones = PRESETS[s.preset][0], list(PRESETS[s.preset][1])
    if s.epochs <= 0:
        raise ValueError(f"schedule.epochs={s.epochs}; expected > 0")
    from .distill.teacher import TEACHER_DTYPES

    if cfg.distill.teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(f"distill.teacher_dtype={cfg.distill.teacher_dtype!r}; expected one of "
                         f"{list(TEACHER_DTYPES)}")
    for module in cfg.distill.imports:
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"distill.imports: cannot import {module!r} ({e}); expected an "
                             "importable module that registers methods") from None
    if cfg.distill.method != "none":
        from .methods import check_method_options

        try:
            check_method_options(cfg.distill.method, cfg.distill.method_options())
        except ValueError as e:
            raise ValueError(f"distill.method={cfg.distill.method!r}: {e}") from None
    if cfg.optim.name not in ("sgd", "adamw"):
        raise ValueError(f"optim.name={cfg.optim.name!r}; expected 'sgd' or 'adamw'")
    if cfg.data.batch_size <= 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size}; expected > 0")
    lo, hi = cfg.data.scale_range if len(cfg.data.scale_range) == 2 else (0, -1)
    if not 0 < lo <= hi:
        raise ValueError(
            f"data.scale_range={cfg.data.scale_range}; expected [lo, hi] with 0 < lo <= hi"
        )
