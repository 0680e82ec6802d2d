"""Build Ultralytics detectors offline: from a model YAML shipped with ultralytics (random
weights) or from a local ``.pt`` checkpoint. Nothing is downloaded: Ultralytics fetches named
weights such as ``yolo11n.pt`` from GitHub when they are missing; here a ``.pt`` that is not on
disk fails at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .ultralytics import (
    UltralyticsDetector,
    ensure_args,
    import_ultralytics,
    is_ultralytics_detector,
)

__all__ = ["yolo_detector"]


# size -> Ultralytics' scale letter, for a YAML named without one (e.g. "yolo11.yaml")
_SCALES = {"tiny": "n", "small": "s", **{c: c for c in "nsmlx"}}


def yolo_detector(name: str | os.PathLike, num_classes: int, *, size: str | None = None,
                  **options: Any) -> UltralyticsDetector:
    """An Ultralytics detector in structkd's calling convention.

    Args:
        name: a model YAML, shipped with ultralytics (``"yolov8n.yaml"``, ``"yolo11s.yaml"``,
            ``"yolo26n.yaml"``, ``"rtdetr-l.yaml"``; the scale letter picks the size) or a local
            file: built with random weights. Or a local ``.pt`` checkpoint (Ultralytics' own,
            or one written by ``save_native``); if its class count differs from
            ``num_classes - 1``, the model is rebuilt with that count and every weight of a
            matching shape is copied (the class head is new), as Ultralytics' trainer does.
        num_classes: structkd's count, background included (K + 1 for K object classes).
        size: the scale of a YAML named without one (``"yolo11.yaml"``): "tiny" (= "n"),
            "small" (= "s") or a letter n/s/m/l/x, where the YAML has that scale; a scale in
            the name (``yolo11s.yaml``) wins, and a ``.pt`` ignores it.
        **options: :class:`UltralyticsDetector`'s (``min_size``, ``max_size``, ...).
    """
    import_ultralytics()
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}; expected an int >= 2 (background + "
                         "at least one class)")
    nc = num_classes - 1
    text = os.fspath(name)
    suffix = Path(text).suffix.lower()
    if suffix in (".yaml", ".yml"):
        model = _from_yaml(text, nc, size)
    elif suffix == ".pt":
        model = _from_checkpoint(_local_checkpoint(text), nc)
    else:
        raise ValueError(f"{text!r}: expected a model YAML (e.g. 'yolov8n.yaml', 'yolo11n.yaml', "
                         "'yolo26n.yaml', 'rtdetr-l.yaml') or a local .pt checkpoint")
    return UltralyticsDetector(model, **options)


def _model_class(rtdetr: bool) -> Any:
    from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel

    return RTDETRDetectionModel if rtdetr else DetectionModel


def _from_yaml(text: str, nc: int, size: str | None) -> nn.Module:
    from ultralytics.nn.tasks import yaml_model_load

    try:
        cfg = yaml_model_load(text)
    except FileNotFoundError:
        raise ValueError(f"{text!r} is neither a local file nor a model YAML shipped with "
                         "ultralytics (e.g. 'yolov8n.yaml', 'yolo11n.yaml', 'yolo26n.yaml', "
                         "'rtdetr-l.yaml')") from None
    if size is not None and size not in _SCALES:
        raise ValueError(f"size={size!r}; expected one of {sorted(_SCALES)}")
    scales = cfg.get("scales") or {}
    if scales and not cfg.get("scale"):  # no scale in the name
        letter = _SCALES[size or "tiny"]
        if letter in scales:  # else Ultralytics takes the YAML's first (rtdetr-l.yaml: "l")
            cfg["scale"] = letter
    head = str(cfg["head"][-1][2])
    if head not in ("Detect", "RTDETRDecoder", "v10Detect"):
        raise ValueError(f"{text!r} has a {head} head; only detection models (Detect, "
                         "RTDETRDecoder) are supported")
    cls = _model_class(head == "RTDETRDecoder")
    return cls(cfg, nc=nc, verbose=False)


def _local_checkpoint(text: str) -> Path:
    """The checkpoint on disk: the path itself, else Ultralytics' weights folder (where its
    downloads go); never a download."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    from ultralytics.utils import SETTINGS

    cached = Path(SETTINGS["weights_dir"]) / path.name
    if path.name == text and cached.is_file():
        return cached
    raise FileNotFoundError(
        f"{text!r} is not a local file; structkd does not download weights (Ultralytics would "
        f"fetch named weights from GitHub). Download it yourself and pass its path, or build a "
        f"model from a YAML such as 'yolo11n.yaml' (looked in {path.resolve().parent} and "
        f"{cached.parent})")


def _from_checkpoint(path: Path, nc: int) -> nn.Module:
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(path))
    if not is_ultralytics_detector(model):
        raise ValueError(f"{path} holds a {type(model).__name__}; expected a detection model "
                         "(DetectionModel or RTDETRDetectionModel)")
    if int(model.model[-1].nc) != nc:
        cls = _model_class(type(model).__name__ == "RTDETRDetectionModel")
        fresh = cls(dict(model.yaml), nc=nc, verbose=False)
        fresh.load(model, verbose=False)
        fresh.args = model.args
        model = fresh
    model.float().train()
    for name, p in model.named_parameters():  # Ultralytics' trainer freezes only the DFL
        p.requires_grad_(".dfl" not in name)
    ensure_args(model)
    return model

