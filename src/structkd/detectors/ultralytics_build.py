"""Build Ultralytics detectors offline: from a model YAML shipped with ultralytics (random
weights) or from a local ``.pt`` checkpoint. Nothing is downloaded: Ultralytics fetches named
weights such as ``yolo11n.pt`` from GitHub when they are missing; here a ``.pt`` that is not on
disk fails at once.

Loading a ``.pt`` never runs code from it: an Ultralytics checkpoint is a pickle of its model
object, and ``ultralytics.YOLO(path)`` unpickles it without restriction, so a crafted file runs
whatever it names. Here it is read by Ultralytics' own restricted loader
(``torch_safe_load(path, safe_only=True)``: ``torch.load(weights_only=True)`` against the
allowlist of the classes genuine Ultralytics checkpoints hold), and anything else is refused,
naming what the file would import. ``trust_checkpoint=True`` loads a file the user vouches for
with Ultralytics' unrestricted loader (logged).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import Adapter, register_adapter
from .ultralytics import (
    INSTALL,
    UltralyticsDetector,
    ensure_args,
    import_ultralytics,
    is_ultralytics_detector,
)

__all__ = ["TRUST_HINT", "load_checkpoint", "pickles_ultralytics", "yolo_detector"]

logger = logging.getLogger("structkd.detectors")

# How a user vouches for a checkpoint, in every interface (named in the refusal).
TRUST_HINT = ("if you trust this file, load it with trust_checkpoint=True (CLI: "
              "--trust-checkpoint; config: model.options.trust_checkpoint / "
              "teacher.options.trust_checkpoint)")


# size -> Ultralytics' scale letter, for a YAML named without one (e.g. "yolo11.yaml")
_SCALES = {"tiny": "n", "small": "s", **{c: c for c in "nsmlx"}}


def yolo_detector(name: str | os.PathLike, num_classes: int, *, size: str | None = None,
                  trust_checkpoint: bool = False, **options: Any) -> UltralyticsDetector:
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
        trust_checkpoint: load a ``.pt`` with Ultralytics' unrestricted unpickler (runs any
            code the file names; only for files you vouch for). By default a ``.pt`` is read
            with ``weights_only=True`` against Ultralytics' allowlist of model classes, and
            anything else is refused.
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
        model = _from_checkpoint(_local_checkpoint(text), nc, trust_checkpoint)
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


def load_checkpoint(path: str | os.PathLike, *, trust_checkpoint: bool = False
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a local Ultralytics ``.pt`` (its EMA where saved, else ``model``; float32,
    eval mode, ``args`` = Ultralytics' defaults updated with its ``train_args``, as
    Ultralytics' ``load_checkpoint`` gives it) and the checkpoint dict.

    Read with ``weights_only=True`` against Ultralytics' allowlist: a file whose pickle names
    anything else (a function to call, a class of another package) is refused with a
    ValueError naming it, and nothing in it runs. ``trust_checkpoint=True``: Ultralytics'
    unrestricted loader, for files the user vouches for (logged as a warning).
    """
    import_ultralytics()
    from ultralytics.nn.tasks import _SafeLoad, torch_safe_load
    from ultralytics.utils import DEFAULT_CFG_DICT

    path = Path(path).expanduser()
    if not path.is_file():  # torch_safe_load would try a download
        raise FileNotFoundError(f"{path} does not exist (structkd never downloads weights)")
    if trust_checkpoint:
        logger.warning("%s: loaded with trust_checkpoint=True, Ultralytics' unrestricted "
                       "unpickler (any code the file names runs)", path)
    elif not _SafeLoad.SUPPORTED:
        raise ValueError(f"{path}: this torch ({torch.__version__}) cannot restrict what an "
                         f"Ultralytics checkpoint loads (torch >= 2.6 can); {TRUST_HINT}")
    try:
        ckpt, _ = torch_safe_load(str(path), safe_only=not trust_checkpoint)
    except (TypeError, pickle.UnpicklingError, ModuleNotFoundError) as e:
        raise ValueError(_refusal(path, e)) from None
    candidate = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(candidate, nn.Module):
        raise ValueError(f"{path}: not an Ultralytics checkpoint (expected a dict whose 'ema' or "
                         f"'model' is a model; found {_describe(ckpt)})")
    model = candidate.float().eval()
    train_args = ckpt.get("train_args")
    model.args = {**DEFAULT_CFG_DICT, **(train_args if isinstance(train_args, dict) else {})}
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    for m in model.modules():  # as Ultralytics' load_checkpoint leaves them
        if hasattr(m, "inplace"):
            m.inplace = True
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return model, ckpt


def _describe(ckpt: object) -> str:
    if isinstance(ckpt, dict):
        return "keys " + ", ".join(repr(k) for k in list(ckpt)[:6])
    return f"a {type(ckpt).__name__}"


def _refusal(path: Path, error: BaseException) -> str:
    """One line saying why a checkpoint was not loaded: the globals outside the allowlist
    that its pickle names (what it would import or call), or why it is unreadable."""
    text = " ".join(str(error).split())
    if isinstance(error, ModuleNotFoundError):
        return (f"{path}: refused: its pickle imports the module {error.name!r}, which a "
                f"genuine Ultralytics checkpoint does not need; nothing in it ran; {TRUST_HINT}")
    if "not a loadable checkpoint" in text or "TorchScript" in text:
        return (f"{path}: not a readable Ultralytics checkpoint (empty, truncated, corrupt or "
                f"TorchScript: {text.removeprefix('ERROR ❌️ ')[:300]})")
    outside = _outside_allowlist(path)
    if outside:
        shown = ", ".join(outside[:4]) + (f" and {len(outside) - 4} more" if len(outside) > 4
                                          else "")
        return (f"{path}: refused: its pickle names {shown}, outside the classes a genuine "
                "Ultralytics checkpoint holds (read with torch.load(weights_only=True) and "
                f"Ultralytics' allowlist); nothing in it ran; {TRUST_HINT}")
    return f"{path}: refused by the restricted loader ({text[:300]}); {TRUST_HINT}"


def _outside_allowlist(path: Path) -> list[str]:
    """The globals ``path``'s pickle references that ``weights_only`` loading does not allow
    (after Ultralytics registered its allowlist for this file)."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint: nothing to list
        return []
    allowed = set()
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        allowed.add(name or f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return [g for g in needed if g not in allowed]


def _from_checkpoint(path: Path, nc: int, trust_checkpoint: bool = False) -> nn.Module:
    model, _ = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    if not is_ultralytics_detector(model):
        raise ValueError(f"{path} holds a {type(model).__name__}; expected a detection model "
                         "(DetectionModel or RTDETRDetectionModel)")
    if int(model.model[-1].nc) != nc:
        logger.warning("%s has %d classes, the data %d: rebuilt with a new class head for %d "
                       "(every other weight of a matching shape copied)", path,
                       int(model.model[-1].nc), nc, nc)
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


def _names() -> list[str]:
    """The detection model YAMLs shipped with the installed ultralytics (a scale letter after
    the version picks the size: ``yolo11.yaml`` -> ``yolo11n.yaml``, ``yolo11s.yaml``, ...)."""
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")  # located, not imported: its import patches
    if spec is None or not spec.submodule_search_locations:  # PIL and reads settings
        raise ImportError(f"Ultralytics models need the ultralytics package: {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations))) / "cfg" / "models"
    other = ("-seg", "-pose", "-obb", "-cls", "world", "yoloe", "-p2", "-p6", "-ghost", "-depth",
             "-sem")  # other tasks and variants
    names = sorted(p.name for p in root.glob("*/*.yaml") if not any(t in p.stem for t in other))
    return names


def pickles_ultralytics(path: str | os.PathLike) -> bool:
    """Whether a torch ``.pt`` file's pickle names Ultralytics' model classes (read as bytes,
    never unpickled); a file that is no readable torch archive is refused, naming it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.endswith("data.pkl")]
            return any(b"ultralytics.nn" in z.read(n) for n in pickles)
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (an Ultralytics .pt or a "
                         "state dict written by torch.save is a zip archive; this one is "
                         f"truncated or corrupt: {type(e).__name__}: {e})") from None


def _claims(name: str) -> bool:
    """A model YAML, or a local ``.pt`` whose pickle names Ultralytics' classes."""
    path = Path(name).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        return True
    return path.suffix == ".pt" and path.is_file() and pickles_ultralytics(path)


register_adapter(Adapter(
    "ultralytics", is_ultralytics_detector, UltralyticsDetector, install=INSTALL,
    build=yolo_detector, names=_names,
    random_weights=lambda name: Path(str(name)).suffix.lower() in (".yaml", ".yml"),
    claims=_claims))
