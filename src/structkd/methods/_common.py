"""Helpers shared by the methods: presets, compute dtype."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import check_choice


def resolve_preset(method: str, presets: Mapping[str, Mapping[str, Any]], preset: str,
                   given: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's values, overridden by every option the user gave (not None)."""
    check_choice("preset", preset, list(presets))
    out = dict(presets[preset])
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def fp32(x: Tensor) -> Tensor:
    """``x`` in float32 (float64 stays float64): losses are computed at full precision."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)
