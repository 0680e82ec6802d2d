"""Detectors from anywhere: a structkd export, a Lightning checkpoint of a structkd run, or a
torchvision builder with its weights (from the torch.hub cache or a local file).

Every loader returns ``(model, info)``: the detector in eval mode and a :class:`DetectorInfo`
with its spec (when structkd built it) and its label map, so evaluation and distillation can check
that labels match instead of trusting a class count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..detectors import family_detector
from ..labels import default_class_names, label_map
from .build import build_detector
from .export import EXPORT_FORMAT
from .spec import DetectorSpec
from .weights import load_torchvision_weights, resolve_weight, weights_file

__all__ = ["DetectorInfo", "describe_state", "load_detector", "load_exported",
           "load_state_into", "torchvision_detector"]


@dataclass
class DetectorInfo:
    """What is known about a loaded detector besides its weights."""

    spec: DetectorSpec | None = None
    class_names: list[str] = field(default_factory=list)  # index = contiguous label, 0 = bg
    label_to_cat_id: dict[int, int] = field(default_factory=dict)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def label_map(self) -> dict[int, tuple[int, str]]:
        """contiguous label -> (category id, name), background excluded."""
        return label_map(self.class_names, self.label_to_cat_id)


def describe_state(state: Mapping[str, torch.Tensor]) -> str:
    """A short guess of the architecture a state dict belongs to (for error messages)."""
    keys = list(state)
    if any(k.startswith("roi_heads.") for k in keys):
        arch = "Faster R-CNN"
    elif any("bbox_ctrness" in k for k in keys):
        arch = "FCOS"
    elif any(k.startswith("head.classification_head.") for k in keys):
        arch = "RetinaNet"
    elif any(k.startswith("head.") for k in keys):
        arch = "SSD"
    else:
        arch = "an unknown model"
    body = ""
    layer3 = re.compile(r"backbone\.body\.layer3\.(\d+)\.")
    blocks = {int(m.group(1)) for k in keys if (m := layer3.match(k))}
    if blocks:
        bottleneck = any(re.match(r"backbone\.body\.layer1\.0\.conv3\.", k) for k in keys)
        depth = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}.get(
            (max(blocks) + 1, bottleneck))
        body = f", ResNet-{depth}" if depth else f", a ResNet with {max(blocks) + 1} C4 blocks"
    elif any(k.startswith("backbone.body.") for k in keys):
        body = ", a MobileNet/other trunk"
    inner = [v for k, v in state.items() if k.startswith("backbone.fpn.inner_blocks.0.")
             and k.endswith("weight") and v.dim() == 4]
    fpn = f", FPN {inner[0].shape[0]}" if inner else ""
    return f"{arch}{body}{fpn} ({len(keys)} tensors)"


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that says what each side looks like."""
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError:
        ours = model.state_dict()
        missing = [k for k in ours if k not in state]
        unexpected = [k for k in state if k not in ours]
        reshaped = [k for k in ours if k in state and hasattr(state[k], "shape")
                    and tuple(state[k].shape) != tuple(ours[k].shape)]
        counts = [f"{len(keys)} {what} (e.g. {keys[0]!r})" for keys, what in
                  ((missing, "missing"), (unexpected, "unexpected"),
                   (reshaped, "of another shape")) if keys]
        raise ValueError(
            f"{source}: the weights look like {describe_state(state)}, but the model to load them "
            f"into is {describe_state(ours)}; tensors: {', '.join(counts) or 'none differ'}"
        ) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable .safetensors file, truncated or corrupt "
                         f"({type(e).__name__}: {e})") from None


def _info_from_meta(meta: Mapping[str, Any], spec: DetectorSpec | None,
                    source: str) -> DetectorInfo:
    names = [str(n) for n in meta.get("class_names") or []]
    l2c = {int(k): int(v) for k, v in (meta.get("label_to_cat_id") or {}).items()}
    return DetectorInfo(spec, names, l2c, source, dict(meta))


def load_exported_detector(prefix: Path) -> tuple[nn.Module, DetectorInfo]:
    """A detector written by ``export_student`` (``prefix.json`` + ``prefix.safetensors``)."""
    json_path = prefix.with_name(prefix.name + ".json")
    weights_path = prefix.with_name(prefix.name + ".safetensors")
    for path in (json_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (a structkd export is a pair "
                                    f"{prefix.name}.json + {prefix.name}.safetensors)")
    document = _read_json(json_path)
    if not isinstance(document, dict) or not isinstance(document.get("meta"), dict) or \
            document["meta"].get("format") != EXPORT_FORMAT:
        raise ValueError(f"{json_path} is not a structkd export; expected a JSON object with "
                         f"meta.format={EXPORT_FORMAT!r}")
    family = document["meta"].get("family")
    if document.get("spec") is None and isinstance(family, dict):
        model = _family_architecture(prefix, json_path, family)
        load_state_into(model, _read_safetensors(weights_path), str(weights_path))
        return model.eval(), _info_from_meta(document["meta"], None, str(prefix))
    if document.get("spec") is None:
        raise ValueError(f"{json_path} holds no spec (the detector was built by user code): "
                         "rebuild it in Python and load the weights with "
                         "safetensors.torch.load_file")
    spec = DetectorSpec.from_dict(document["spec"])
    state = _read_safetensors(weights_path)
    model = build_detector(spec)
    load_state_into(model, state, str(weights_path))
    return model.eval(), _info_from_meta(document["meta"], spec, str(prefix))


def _family_architecture(prefix: Path, json_path: Path, family: Mapping[str, Any]) -> nn.Module:
    """A detector of another family rebuilt from the native save beside its export (its
    architecture; the weights are loaded by the caller)."""
    native = prefix.parent / str(family.get("rebuild") or family["native"])
    if not native.exists():
        raise FileNotFoundError(f"{native} does not exist: {json_path} is a "
                                f"{family['adapter']} detector, rebuilt from that native save")
    options = dict(family.get("options") or {})
    if "trust_checkpoint" in options:  # only the user vouches for a file, never the file
        raise ValueError(f"{json_path}: meta.family.options holds trust_checkpoint; an "
                         "export cannot vouch for its own files (remove the key)")
    return family_detector(family["adapter"], str(native), int(family["num_classes"]),
                           **options)


def load_exported(path_prefix: str | Path, *, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, DetectorSpec, dict[str, Any]]:
    """Rebuild a model written by ``export_student``: ``(model, spec, meta)``, in eval mode."""
    model, info = load_exported_detector(Path(path_prefix))
    assert info.spec is not None
    return model.to(device), info.spec, info.meta


def load_checkpoint_detector(path: Path) -> tuple[nn.Module, DetectorInfo]:
    """The student of a Lightning checkpoint written by a structkd run (no teacher inside)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable PyTorch checkpoint, truncated or not written by "
                         f"torch.save (torch.load raised {type(e).__name__}: {first})") from None
    info = ckpt.get("structkd") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of a structkd run (no 'structkd' entry; "
                         "a Lightning checkpoint of another program?)")
    prefix = "net.student."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not info.get("spec"):  # a student of another family: its run's export has the design
        export = path.parent.parent / "student"
        json_path = export.with_name("student.json")
        document = _read_json(json_path) if json_path.is_file() else None
        family = (document.get("meta") or {}).get("family") if isinstance(document, dict) \
            else None
        if not isinstance(family, dict):
            raise ValueError(f"{path} is a checkpoint of a structkd run whose student is not "
                             f"built by structkd's torchvision builders; its architecture comes "
                             f"from the run's export, and {json_path} holds none (the run did "
                             "not finish?)")
        model = _family_architecture(export, json_path, family)
        load_state_into(model, state, str(path))
        return model.eval(), _info_from_meta({**document["meta"], **info}, None, str(path))
    spec = DetectorSpec.from_dict({**info["spec"], "weights": None, "backbone_weights": None})
    model = build_detector(spec)
    load_state_into(model, state, str(path))
    return model.eval(), _info_from_meta(info, spec, str(path))


def torchvision_detector(builder: str, weights: str | None = None, *,
                         num_classes: int | None = None, **builder_options: Any
                         ) -> tuple[nn.Module, DetectorInfo]:
    """A detector from a torchvision builder (``"retinanet_resnet50_fpn_v2"``) and its weights.

    ``weights`` is the weights enum (``"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"``, read from
    the torch.hub cache, downloaded with a short timeout, or a clear error saying where to put
    the file), or the path of a local file holding that builder's state dict. The label map of
    the enum's categories comes with it (COCO: ids 0-90 with "N/A" gaps, as torchvision numbers
    them). Without weights the model is randomly initialised (``num_classes`` required).
    ``builder_options`` go to the builder (``min_size``, ``max_size``, ...).
    """
    known = torchvision_builders()
    if builder not in known:
        raise ValueError(f"teacher.torchvision={builder!r} is not a torchvision detection "
                         f"builder{close_names(builder, known)}; expected one of "
                         f"{sorted(known)}")
    fn = torchvision.models.get_model_builder(builder)
    names: list[str] = []
    state = None
    if weights is None:
        if num_classes is None:
            raise ValueError(f"torchvision builder {builder!r} without weights needs num_classes")
    elif Path(weights).expanduser().is_file():
        path = Path(weights).expanduser()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # torchvision's reference scripts save {"model": ...}
    else:
        if "." not in weights or weights.endswith((".pth", ".pt", ".bin")):
            raise FileNotFoundError(f"teacher.weights={weights!r} is neither an existing file "
                                    "nor a torchvision weights enum name like "
                                    "'RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1'")
        enum = resolve_weight(weights, "teacher.weights")
        names = list(enum.meta.get("categories", []))
        state = load_torchvision_weights(weights)
    if state is not None and num_classes is None:
        num_classes = _classes_in_state(state) or (len(names) or None)
    model = fn(**{"weights_backbone": None, **builder_options, "weights": None,
                  "num_classes": num_classes})
    source = f"torchvision {builder}" + (f" with {weights}" if weights else "")
    if state is not None:
        load_state_into(model, state, source)
    if not names and num_classes:
        names = default_class_names(num_classes)
    info = DetectorInfo(None, names, {i: i for i in range(1, len(names))}, source,
                        {"torchvision_builder": builder, "weights": weights,
                         "weights_file": str(weights_file(weights)) if weights and
                         not Path(weights).expanduser().is_file() else weights})
    return model.eval(), info


def torchvision_builders() -> list[str]:
    """The names of torchvision's detection builders (``retinanet_resnet50_fpn_v2``, ...)."""
    return list(torchvision.models.list_models(torchvision.models.detection))


def close_names(name: str, known: list[str]) -> str:
    """ ``" (did you mean 'a' or 'b'?)"`` for the known names close to ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _classes_in_state(state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count a torchvision detector's state dict was built for, where readable."""
    w = state.get("roi_heads.box_predictor.cls_score.weight")
    if w is not None:
        return int(w.shape[0])
    w = state.get("head.classification_head.cls_logits.weight")
    anchors_w = state.get("head.regression_head.bbox_reg.weight")
    if w is not None and anchors_w is not None:
        a = anchors_w.shape[0] // 4
        return int(w.shape[0] // a) if a else None
    return None


def load_detector(path: str | Path) -> tuple[nn.Module, DetectorInfo]:
    """A detector from an export prefix (``x`` for ``x.safetensors``/``x.json``, either file
    also accepted) or a structkd run's Lightning ``.ckpt``; in eval mode."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{p} is a directory; expected an export prefix (DIR/student) or a "
                         ".ckpt file")
    if p.suffix == ".ckpt":
        return load_checkpoint_detector(p)
    if p.suffix in (".pth", ".pt", ".bin"):
        raise ValueError(f"{p}: a {p.suffix} file is neither a structkd export (DIR/student) nor a "
                         "structkd run's .ckpt; for a torchvision detector's state dict give its "
                         f"builder and this file: --teacher BUILDER --teacher-weights {p} "
                         "(teacher.torchvision + teacher.weights)")
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return load_exported_detector(p)
