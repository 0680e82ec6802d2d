"""One way to make a detector, whatever its family (as timm's ``create_model`` is for
backbones): :func:`detector` takes a name or a path and asks, in this order, structkd's own
torchvision builds, torchvision's detection builders, each registered family's adapter
(``Adapter.claims``) and the saved detectors structkd reads (exports and run checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..detectors import adapters, claiming_family, class_count, family_detector
from .build import build_detector
from .load import close_names, load_detector, torchvision_builders, torchvision_detector
from .spec import ARCHS, DetectorSpec

__all__ = ["detector", "source_kind"]


def detector(name: str | os.PathLike, num_classes: int | None = None, **options: Any
             ) -> nn.Module:
    """A detector, ready to train, from a name or a path.

    Args:
        name: one of
            * structkd's torchvision builds, ``"retinanet"``, ``"fcos"``, ``"fasterrcnn"``
              (``options``: the fields of :class:`~structkd.models.DetectorSpec`, e.g.
              ``backbone``, ``fpn_channels``, ``min_size``);
            * a torchvision detection builder, ``"retinanet_resnet50_fpn_v2"``
              (``weights``: its weights enum or a local state-dict file; none: random);
            * a name of another family: a transformers model type (``"rt_detr"``), a
              save_pretrained folder or a hub name; an Ultralytics model YAML
              (``"yolo11n.yaml"``) or a local ``.pt`` (``options``: the family builder's, e.g.
              ``min_size``, ``trust_checkpoint``);
            * a saved structkd detector: an export prefix (``run/student``), its
              ``.safetensors`` or ``.json``, or a run's ``.ckpt``.
        num_classes: structkd's class count, background included (K + 1 for K object classes);
            required to build, checked against a saved detector's.

    Returns the module that trains (a family's wrapper, or torchvision's model itself).
    """
    text = os.fspath(name)
    kind = source_kind(text)
    if kind == "build":
        return build_detector(DetectorSpec(arch=text, num_classes=_required(num_classes, text),
                                           **options))
    if kind == "torchvision":
        model, _ = torchvision_detector(text, options.pop("weights", None),
                                        num_classes=num_classes, **options)
        return model.train()
    if kind != "saved":
        return family_detector(kind, text, _required(num_classes, text), **options)
    if options:
        raise ValueError(f"{text!r} is a saved detector; options {sorted(options)} apply "
                         "only when building one")
    model, _ = load_detector(Path(text).expanduser())
    have = class_count(model)
    if num_classes is not None and have is not None and have != num_classes:
        raise ValueError(f"{text!r} predicts {have - 1} classes (num_classes={have}); "
                         f"num_classes={num_classes} was asked for")
    return model.train()


def source_kind(name: str | os.PathLike, *, saved_by_form: bool = False) -> str:
    """What ``name`` names, asked in :func:`detector`'s order: ``"build"`` (structkd's
    torchvision builds), ``"torchvision"`` (a detection builder), the name of the family whose
    adapter claims it (an Ultralytics ``.pt`` / YAML, a transformers folder or model type; a
    ``.pt`` is read as bytes here, never unpickled), or ``"saved"`` (a structkd export or run
    checkpoint). ``saved_by_form``: also take a name that only looks like a path (a ``/``, a
    ``.ckpt`` / ``.safetensors`` suffix) as saved, for a file a later step reads or reports
    missing. Anything else is a ``ValueError`` naming the close names and what was expected.
    """
    text = os.fspath(name)
    if text in ARCHS:
        return "build"
    if text in torchvision_builders():
        return "torchvision"
    family = claiming_family(text)  # ValueError for a .pt no torch archive reader can open
    if family is not None:
        return family
    path = Path(text).expanduser()
    saved = [path, *(path.with_name(path.name + s) for s in (".json", ".safetensors"))]
    if any(p.exists() for p in saved) or (saved_by_form and (
            "/" in text or path.suffix in (".ckpt", ".safetensors"))):
        return "saved"
    known = [*ARCHS, *torchvision_builders()]
    families = [a.name for a in adapters() if a.claims is not None]
    raise ValueError(f"{text!r} is not a detector structkd can make{close_names(text, known)}: "
                     f"expected one of {list(ARCHS)} (structkd's builds), a torchvision "
                     f"detection builder such as 'retinanet_resnet50_fpn_v2', a name of the "
                     f"families {families} (e.g. 'rt_detr', 'yolo11n.yaml'), or a saved "
                     "detector (an export prefix, .safetensors, .json or .ckpt)")


def _required(num_classes: int | None, name: str) -> int:
    if num_classes is None:
        raise ValueError(f"detector({name!r}) builds a new detector: give num_classes (the "
                         "data's class count, background included)")
    return num_classes
