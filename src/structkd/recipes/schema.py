"""The YAML experiment file (``Config``): its sections, each derived from the API it configures.

=========  ========================================================================
section    derived from
=========  ========================================================================
data       the data paths here, ``make_synthetic_coco`` (``data.synthetic``),
           ``build_transforms`` (augmentation) and :class:`Loader`
model      the fields of ``DetectorSpec`` (``num_classes`` comes from the data)
teacher    :class:`TeacherSource` (where the teacher comes from)
distill    the keyword parameters of ``Distiller`` (``options``: the method's own) and
           :class:`Balance` (weight "auto", what the run watches)
optim      :class:`Optim`
schedule   :class:`Schedule`
trainer    :class:`TrainerOptions`
=========  ========================================================================

``load_config`` reads a YAML file and ``--set`` overrides into a ``Config`` (the library and
the checks are in :mod:`structkd.config`), imports ``distill.imports`` and checks the method
and its options by the same code that builds them.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import (
    ConfigError,
    compose,
    dump,
    load,
    part,
    section_from_dataclass,
    section_from_signature,
    to_dict,
)
from ..data.synthetic import make_synthetic_coco, synthetic_params
from ..data.transforms import build_transforms
from ..detectors import DetectorFamily
from ..distill import Distiller
from ..engine.options import Balance, Loader, Optim, Schedule, TrainerOptions
from ..methods import DEFAULT_METHOD, check_method
from ..methods.together import SEPARATOR, split_names
from ..models import DetectorSpec
from ..models.create import source_kind
from ..models.load import close_names, torchvision_builders

__all__ = ["RENAMED", "Config", "TeacherSource", "load_config", "teacher_fields"]


# ---- data -------------------------------------------------------------------------------------
def _check_synthetic(section: Any) -> None:
    options = asdict(section)
    options.pop("root")
    try:
        synthetic_params(**options)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("make_synthetic_coco: ")) from None


SyntheticSection = section_from_signature(
    make_synthetic_coco, "SyntheticSection", skip=("overwrite",),
    defaults={"root": "~/.cache/structkd/synthetic"}, check=_check_synthetic,
    doc="The built-in dataset, used when no data path is given: the options of "
        "``structkd.data.make_synthetic_coco`` (``root``: where it is generated and cached).")


@dataclass
class DataPaths:
    """COCO annotation files and image folders; with none given, the built-in data is used."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)  # type: ignore[valid-type]

    def __post_init__(self) -> None:
        given = {k: getattr(self, k) for k in ("train_ann", "train_images", "val_ann",
                                                "val_images")}
        if any(v is not None for v in given.values()) and any(v is None for v in
                                                              given.values()):
            missing = [f"data.{k}" for k, v in given.items() if v is None]
            have = [f"data.{k}" for k, v in given.items() if v is not None]
            raise ValueError(f"{missing} not set while {have} are; give all four data paths "
                             "(or none, for the built-in synthetic dataset)")


def _check_augment(section: Any) -> None:
    build_transforms(True, **asdict(section))


Augment = section_from_signature(
    build_transforms, "Augment", skip=("train",), check=_check_augment,
    doc="Training-time augmentation: the options of ``structkd.data.build_transforms``.")
DataSection = compose("DataSection", DataPaths, Augment, Loader,
                      doc="Where the images come from, how training images are augmented, "
                          "and how they are loaded.")


# ---- model, teacher, distillation -------------------------------------------------------------
# Defaults sized for small inputs; every other default is DetectorSpec's own.
MODEL_DEFAULTS: dict[str, Any] = {
    "arch": "retinanet", "backbone": "resnet18", "fpn_channels": 128, "min_size": 256,
    "max_size": 256,
}


def _check_model(section: Any) -> None:
    DetectorSpec(num_classes=2, **asdict(section))


SpecSection = section_from_dataclass(
    DetectorSpec, "SpecSection", skip=("num_classes",), defaults=MODEL_DEFAULTS,
    check=_check_model,
    doc="A torchvision detector: the fields of ``structkd.models.DetectorSpec``.")
def _check_family_keys(section: Any) -> None:
    """A model of another family takes only ``min_size`` / ``max_size`` of the torchvision keys:
    any other one set (away from its default) would be silently ignored."""
    if section.family == "torchvision":
        return
    defaults = SpecSection()
    ignored = [f"{f.name}={getattr(section, f.name)!r}" for f in dataclasses.fields(SpecSection)
               if f.name not in ("min_size", "max_size")
               and getattr(section, f.name) != getattr(defaults, f.name)]
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: torchvision key(s) that a {section.family} "
                         f"model ignores (it is built from name={section.name!r}; of the "
                         "torchvision keys it takes min_size and max_size, and its builder's "
                         "own options go in options); remove them")


ModelSection = compose(
    "ModelSection", DetectorFamily, SpecSection, check=_check_family_keys,
    doc="The detector to train: ``family`` torchvision (default) with the fields of "
        "``structkd.models.DetectorSpec`` (``num_classes`` comes from the data), or another "
        "family (``structkd.detectors.DetectorFamily``: ``family``, ``name``, ``size``; "
        "``min_size`` / ``max_size`` still set its input size).")


@dataclass
class TeacherSource:
    """Where the teacher comes from: ``checkpoint`` (a structkd export prefix, its
    ``.safetensors``, or a Lightning ``.ckpt`` of a structkd run), or ``torchvision`` (a
    detection builder name such as ``retinanet_resnet50_fpn_v2``) with ``weights`` (its weights
    enum, e.g. ``RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1``, read from the torch.hub cache, or
    a local ``.pth`` of that builder's state dict) and ``num_classes`` (builder without COCO
    weights only). ``strict_classes``: the teacher's label set must be the dataset's.
    ``cache``: a teacher cache written by ``structkd cache-teacher`` (the teacher is then not
    built at all); ``cache_dtype``: the precision ``cache-teacher`` stores the levels in
    (``int8``: 8-bit codes with a min and scale per image and channel, half of float16's size);
    a run from ``cache`` names the cache's precision (its recorded config says what it trained
    from).
    Or ``family`` + ``name``: a detector of another family from its builder (``structkd
    models``), e.g. ``ultralytics`` + a local ``yolo11s.pt``, ``transformers`` + a
    ``save_pretrained`` folder or a hub name (online); ``options``: the builder's other options
    (``size``, ``num_queries``, ...). Its class head is built for ``num_classes`` (default the
    dataset's), which a feature teacher never runs. ``allow_untrained``: accept a teacher
    built with random weights (a model YAML or type, a torchvision builder without
    ``weights``), which is refused otherwise: an untrained teacher only teaches noise."""

    checkpoint: str | None = None
    torchvision: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    strict_classes: bool = True
    cache: str | None = None
    cache_dtype: Literal["float16", "bfloat16", "float32", "int8"] = "float16"
    family: str | None = None
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    allow_untrained: bool = False

    def model_source(self) -> str | None:
        """What names the teacher model (None: no teacher model, maybe a cache)."""
        if self.family:
            return f"{self.family}:{self.name}"
        return self.checkpoint or self.torchvision

    def __post_init__(self) -> None:
        given = [f"{k}={v!r}" for k, v in (("checkpoint", self.checkpoint),
                                            ("torchvision", self.torchvision),
                                            ("family", self.family)) if v]
        if self.cache and given:
            raise ValueError(f"cache={self.cache!r} and a teacher model ({given[0]}) are both "
                             "set; a run from a cache never builds the teacher: keep only cache")
        if len(given) > 1:
            both = "both" if len(given) == 2 else "all"
            raise ValueError(f"{' and '.join(given)} are {both} set; expected one of them")
        if self.name and not self.family:
            raise ValueError(f"name={self.name!r} goes with family (e.g. family: ultralytics)")
        if self.family:
            if self.family == "torchvision":
                raise ValueError("family='torchvision': a torchvision teacher is "
                                 "teacher.torchvision (a builder name) or teacher.checkpoint "
                                 "(a structkd run's export)")
            DetectorFamily(family=self.family, name=self.name)  # known family, name given
            if self.weights:
                raise ValueError(f"weights={self.weights!r} goes with torchvision; a "
                                 f"{self.family} teacher's weights are in its name (a file, "
                                 "a folder or a hub name)")
        if self.checkpoint and self.weights:
            raise ValueError(f"weights={self.weights!r} goes with torchvision (a builder name), "
                             "not with checkpoint")
        if self.torchvision:
            builders = torchvision_builders()
            if self.torchvision not in builders:
                raise ValueError(f"torchvision={self.torchvision!r} is not a torchvision "
                                 f"detection builder{close_names(self.torchvision, builders)}")


def teacher_fields(name: str, weights: str | None = None, *, flag: str = "teacher"
                   ) -> dict[str, Any]:
    """The ``teacher`` keys that name one teacher: ``torchvision`` for a detection builder,
    ``checkpoint`` for a saved structkd detector, ``family`` + ``name`` for a name a family
    claims (what :func:`structkd.models.source_kind` says of it); ``weights`` goes with a
    builder. ``flag`` names where ``name`` came from in the messages (e.g. ``--teacher``)."""
    try:
        kind = source_kind(name, saved_by_form=True)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if kind == "build":
        raise ValueError(f"{flag}: {name!r} is one of structkd's own untrained builds; a "
                         "teacher is a trained detector: a structkd export or .ckpt, a "
                         "torchvision builder with weights, an Ultralytics .pt or a "
                         "transformers folder")
    fields: dict[str, Any] = ({"torchvision": name} if kind == "torchvision" else
                              {"checkpoint": name} if kind == "saved" else
                              {"family": kind, "name": name})
    if weights is not None:
        fields["weights"] = weights
    return fields


DistillerSection = section_from_signature(
    Distiller.__init__, "DistillerSection", skip=("student", "teacher"), var_keyword="options",
    defaults={"method": None},
    extra=[("imports", list[str], [])],
    doc="The keyword options of ``structkd.Distiller``.")
DistillSection = compose(
    "DistillSection", DistillerSection, Balance,
    doc="The distillation: the keyword options of ``structkd.Distiller`` and of ``Balance``. "
        "``method``: a method name or alias (``structkd methods``), \"none\", or null (ssim "
        "with a teacher, none without); ``weight``: a number, null (the method's default) or "
        "\"auto\" (measured on the first batches: ``auto_ratio``, ``auto_batches``, "
        "``auto_every``); ``watch_*``: what the run watches while it trains; ``options``: the "
        "method's own options; ``imports``: modules to import first, where your own "
        "``@register_method`` classes live.")


@dataclass
class Config:
    """One experiment: every section of the YAML file."""

    data: DataSection = field(default_factory=DataSection)  # type: ignore[valid-type]
    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    teacher: TeacherSource = field(default_factory=TeacherSource)
    distill: DistillSection = field(default_factory=DistillSection)  # type: ignore[valid-type]
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    trainer: TrainerOptions = field(default_factory=TrainerOptions)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return dump(self)

    def loader(self) -> Loader:
        return part(self.data, Loader)

    def trust_checkpoints(self) -> None:
        """Let the builders of this run's detectors of other families run code from their
        files (``options.trust_checkpoint``), as ``--trust-checkpoint`` asks; torchvision
        weights and structkd's own files are read without code and need no trust."""
        sections = [s for s in (self.model, self.teacher) if s.family not in (None,
                                                                               "torchvision")]
        if not sections:
            raise ValueError("--trust-checkpoint applies to a model or teacher of another "
                             "family (model.family / teacher.family with a name); torchvision "
                             "weights and structkd's own files are read with weights_only=True "
                             "or as safetensors and need no trust")
        for section in sections:
            section.options["trust_checkpoint"] = True

    def spec(self, num_classes: int) -> DetectorSpec | None:
        """The student's ``DetectorSpec``; None for a detector of another family."""
        if self.model.family != "torchvision":
            return None
        return DetectorSpec(num_classes=num_classes, **asdict(part(self.model, SpecSection)))


# Keys of earlier versions, and where they went.
RENAMED = {
    "distill.distance": "distill.method",
    "distill.adapter": "distill.options.adapter",
    "data.synthetic_root": "data.synthetic.root",
    "data.synthetic_train": "data.synthetic.num_train",
    "data.synthetic_val": "data.synthetic.num_val",
    "data.synthetic_size": "data.synthetic.image_size",
    "data.synthetic_seed": "data.synthetic.seed",
    "data.synthetic_options": "data.synthetic.<option> (max_objects, max_occlusion, clutter, "
                              "size_probs)",
    "data.hflip": "data.hflip_prob",
}


def load_config(path: str | os.PathLike | None = None,
                overrides: Sequence[str | Mapping[str, Any]] = (), *,
                base: dict[str, Any] | None = None) -> Config:
    """A ``Config`` from the defaults, then ``base``, then the YAML file at ``path``, then the
    overrides, later ones winning: ``section.key=value`` texts (the value read as YAML) or
    nested mappings of values. Errors name the key and the value."""
    cfg = load(Config, Path(path) if path is not None else None, list(overrides), base=base,
               renamed=RENAMED)
    check_distill(cfg)
    return cfg


def check_distill(cfg: Config) -> None:
    """Import ``distill.imports``, then check the method and its options by building it."""
    d = cfg.distill
    for module in d.imports:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"distill.imports: cannot import {module!r} ({e}); expected an "
                              "importable module that registers methods") from None
        except Exception as e:  # the module itself failed: a syntax error, a raise
            where = ""
            if isinstance(e, SyntaxError):
                where = f" ({Path(e.filename or '?').name}, line {e.lineno})"
            raise ConfigError(f"distill.imports: importing {module!r} failed: "
                              f"{type(e).__name__}: {getattr(e, 'msg', None) or e}{where}"
                              ) from None
    if "weight" in d.options:
        raise ConfigError("distill.options.weight: set distill.weight instead")
    if isinstance(d.method, list):  # several methods: one name, as runs and tables show it
        try:
            d.method = SEPARATOR.join(split_names(d.method))
        except ValueError as e:
            raise ConfigError(f"distill.method={d.method!r}: {e}") from None
    if d.method == "none":
        return
    method = d.method or DEFAULT_METHOD  # null: the default when there is a teacher
    options = dict(d.options)
    if d.weight is not None and d.weight != "auto":
        options["weight"] = d.weight
    try:
        check_method(method, options)
    except (ValueError, TypeError) as e:
        message = str(e)
        named = next((k for k in options if message.startswith(f"{k}=")), None)
        if named is not None:  # a bad value of one option: name its key
            key = "distill.weight" if named == "weight" else f"distill.options.{named}"
            owner = "" if "(method " in message or "(distance " in message else \
                f" (method {method!r})"
            raise ConfigError(f"{key}{message[len(named):]}{owner}") from None
        if message.startswith("option(s) ["):  # unknown names: the valid ones are listed
            raise ConfigError(f"distill.options (method {method!r}): {message}") from None
        raise ConfigError(f"distill.method={method!r}: {message}") from None
