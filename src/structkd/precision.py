"""Full precision where it matters: losses and dry runs compute in fp32 (fp64 stays fp64)
whatever autocast or the features' dtype say."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["compute_dtype", "fp32", "no_autocast"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: never half precision."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fp32(x: Tensor) -> Tensor:
    """``x`` in its compute dtype (float32; float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def no_autocast(where: Tensor | torch.device | str) -> contextlib.AbstractContextManager:
    """A region where autocast is off on the device of ``where`` (a tensor, a device or a
    device type); a no-op for device types autocast does not know."""
    if isinstance(where, Tensor):
        device_type = where.device.type
    elif isinstance(where, torch.device):
        device_type = where.type
    else:
        device_type = where
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
