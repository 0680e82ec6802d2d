"""Save and load a trained detector: ``<prefix>.safetensors`` (weights) + ``<prefix>.json``.

The JSON holds the spec that rebuilds the architecture without downloading anything, and meta
data such as the label map; nothing is unpickled on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torchvision
from torch import nn

from .._version import __version__
from .build import build_detector
from .spec import DetectorSpec, as_spec

__all__ = ["EXPORT_FORMAT", "export_student"]

EXPORT_FORMAT = "structkd-detector"


def _export_spec(spec: DetectorSpec) -> DetectorSpec:
    """Resolved spec that rebuilds the same architecture without downloading anything."""
    return dataclasses.replace(spec.resolved(), weights=None, backbone_weights=None)


def export_student(
    model: nn.Module,
    spec: DetectorSpec | Mapping[str, Any] | None,
    path_prefix: str | os.PathLike,
    extra_meta: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<prefix>.safetensors`` (the detector's weights only) and ``<prefix>.json``.

    The JSON holds the resolved spec (weight names moved to ``meta['init_weights']`` so rebuilding
    never downloads), the structkd version and ``extra_meta`` (e.g. class names). The state dict
    must match the spec exactly, so a distillation wrapper holding a teacher is rejected. A
    detector built by user code has no spec (``spec=None``): its weights and meta are written,
    and it is rebuilt by that code.
    """
    state = model.state_dict()
    teacher_keys = [k for k in state if "teacher" in k]
    if teacher_keys:
        raise ValueError(
            f"model has teacher weights ({teacher_keys[:3]}...); expected the student detector only"
        )
    rebuilt_spec = None
    if spec is not None:
        spec = as_spec(spec)
        rebuilt_spec = _export_spec(spec)
        reference = build_detector(rebuilt_spec).state_dict()
        shape_of = {k: tuple(v.shape) for k, v in reference.items()}
        if shape_of != {k: tuple(v.shape) for k, v in state.items()}:
            missing = sorted(set(shape_of) - set(state))[:5]
            unexpected = sorted(set(state) - set(shape_of))[:5]
            raise ValueError(
                f"model state does not match spec (arch={spec.arch!r}, "
                f"backbone={spec.backbone!r}): missing {missing}, unexpected {unexpected}, or "
                "differing shapes"
            )
    # clone(): own, contiguous storage per tensor, so tied/shared tensors cannot trip safetensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "structkd_version": __version__,
        "torchvision_version": torchvision.__version__,
        "init_weights": (spec.weights or spec.backbone_weights) if spec is not None else None,
        **dict(extra_meta or {}),
    }
    document = {"spec": rebuilt_spec.to_dict() if rebuilt_spec else None, "meta": meta}
    text = json.dumps(document, indent=2, sort_keys=True)
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    weights_path = prefix.with_name(prefix.name + ".safetensors")
    json_path = prefix.with_name(prefix.name + ".json")

    from safetensors.torch import save_file

    save_file(tensors, str(weights_path), metadata={"format": EXPORT_FORMAT, "structkd": text})
    json_path.write_text(text + "\n")
    return weights_path, json_path
