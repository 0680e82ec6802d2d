"""Torchvision weights, offline-safe: from torch.hub's cache, or a fast, clear failure."""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path

import torch
from torch import nn

from .spec import DetectorSpec, resolve_weight

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "load_detector_weights",
    "load_torchvision_weights",
    "weights_file",
]

DOWNLOAD_TIMEOUT_S = 10.0
# Layers that depend on num_classes; they stay freshly initialised when fine-tuning COCO weights.
_CLASS_SPECIFIC_PREFIXES: dict[str, tuple[str, ...]] = {
    "retinanet": ("head.classification_head.cls_logits.",),
    "fcos": ("head.classification_head.cls_logits.",),
    "fasterrcnn": ("roi_heads.box_predictor.",),
}


def weights_file(name: str) -> Path:
    """Where torch.hub keeps (or looks for) the file of torchvision weights ``name``."""
    url = resolve_weight(name, "weights").url
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return cache_dir / os.path.basename(urllib.parse.urlparse(url).path)


def load_torchvision_weights(
    name: str, *, timeout: float = DOWNLOAD_TIMEOUT_S
) -> dict[str, torch.Tensor]:
    """State dict of torchvision weights ``name``, from torch.hub's cache or downloaded.

    Offline, the download fails fast (socket timeout ``timeout`` seconds) with a ``RuntimeError``
    telling where to put the file by hand. Checkpoints are read with ``weights_only=True``.
    """
    url = resolve_weight(name, "weights").url
    cached = weights_file(name)
    if cached.is_file():
        try:
            return torch.load(cached, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{cached} (torchvision weights {name!r}) cannot be read: "
                             f"{type(err).__name__}: {err}") from err
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # process-wide while downloading; urllib has no other hook
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as err:
        raise RuntimeError(
            f"could not download torchvision weights {name!r} from {url} ({type(err).__name__}: "
            f"{err}). Without internet access, download that file elsewhere and put it at "
            f"{cached} (the torch.hub cache: $TORCH_HOME/hub/checkpoints, TORCH_HOME defaults to "
            "~/.cache/torch)"
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def load_detector_weights(
    model: nn.Module, spec: DetectorSpec, state: dict[str, torch.Tensor]
) -> None:
    """Load COCO detector weights; with another num_classes, skip the class-specific layers."""
    assert spec.weights is not None
    coco_classes = len(resolve_weight(spec.weights, "weights").meta["categories"])
    skipped: tuple[str, ...] = ()
    if spec.num_classes != coco_classes:
        skipped = _CLASS_SPECIFIC_PREFIXES[spec.arch]
        state = {k: v for k, v in state.items() if not k.startswith(skipped)}
    try:
        result = model.load_state_dict(state, strict=not skipped)
    except RuntimeError as err:
        raise ValueError(
            f"weights={spec.weights!r} do not fit the model built from the spec (check "
            f"fpn_channels={spec.fpn_channels}, expected 256 for torchvision weights): {err}"
        ) from err
    bad_missing = [k for k in result.missing_keys if not k.startswith(skipped)]
    if bad_missing or result.unexpected_keys:
        raise ValueError(
            f"weights={spec.weights!r} do not fit the model built from the spec: missing "
            f"{bad_missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
