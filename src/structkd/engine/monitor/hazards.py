"""Known platform hazards worth a warning before a run starts."""

from __future__ import annotations

import torch

from ...models import DetectorSpec
from ..options import TrainerOptions


def cpu_bf16_hazard(t: TrainerOptions, spec: DetectorSpec) -> str | None:
    """A warning for bf16 training on CPU at inputs of up to 64 px, else None.

    Seen with torch 2.14.1 on AVX-512 CPUs: oneDNN's bf16 convolution backward returns garbage
    (NaN, 1e19) weight gradients, at random, for a stride-2 convolution over a 1-pixel-wide
    input. RetinaNet and FCOS compute P7 that way from P6 (stride 64), so inputs of 64 px or
    less make training diverge after the first step; fp32 and larger inputs are unaffected.
    """
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if not (on_cpu and str(t.precision).startswith("bf16") and spec.arch in ("retinanet", "fcos")
            and spec.min_size <= 64):
        return None
    return (f"trainer.precision={t.precision} on CPU with model.min_size={spec.min_size}: "
            "oneDNN's bf16 convolution backward gives random garbage gradients for the P7 "
            "convolution over a 1-pixel-wide P6 (torch 2.14.1); use min_size > 64 or "
            "precision 32-true")
