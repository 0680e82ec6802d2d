"""Multi-level feature distillation: adapters on the student, a distance per level, a weighted sum.

    L_feat = weight * sum_r D(phi_r(S_r), T_r)

``phi_r`` is a trainable 1x1 convolution per level (the paper's adaptation layer), built here at
construction so that it is registered with the module and trained with the student; it is dropped
at inference. Teacher features are always detached.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .adapters import make_adapters
from .l1 import L1Loss
from .mse import MSELoss
from .ssim import SSIMLoss

DISTANCES: dict[str, type[nn.Module]] = {
    "ssim": SSIMLoss,
    "l1": L1Loss,
    "mse": MSELoss,
    "l2": MSELoss,
}

Features = Mapping[str, Tensor] | Sequence[Tensor]


def build_distance(name: str, **options) -> nn.Module:
    """Build a registered distance by name, checking ``options`` against its signature."""
    if name not in DISTANCES:
        raise ValueError(f"distance={name!r} is unknown; expected one of {sorted(DISTANCES)}")
    cls = DISTANCES[name]
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(p for p in params if p != "self")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"option(s) {unknown} are not accepted by distance {name!r}; expected some of {allowed}"
        )
    return cls(**options)


def _as_named(feats: Features, what: str) -> dict[str, Tensor]:
    if isinstance(feats, Mapping):
        return dict(feats)
    if isinstance(feats, Sequence) and not isinstance(feats, str | bytes):
        return {str(i): f for i, f in enumerate(feats)}
    raise ValueError(f"{what} features must be a dict or a list of tensors, got {type(feats)}")


def _names_and_channels(channels: Mapping[str, int] | Sequence[int], what: str) -> dict[str, int]:
    named = dict(channels) if isinstance(channels, Mapping) else dict(enumerate(channels))
    out = {str(k): v for k, v in named.items()}
    if not out:
        raise ValueError(f"{what}_channels is empty; expected one channel count per level")
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what}_channels[{k!r}]={v!r}; expected a positive int")
    return out


class FeatureDistillLoss(nn.Module):
    """Weighted sum over levels of a distance between adapted student and teacher features.

    Args:
        student_channels: channel count per level, as a dict (level name -> channels) or a list.
        teacher_channels: the same for the teacher; levels are paired by name (or position).
        distance: "ssim" (default), "l1", "mse"/"l2", or an ``nn.Module`` taking (student, teacher).
        weight: lambda, the factor on the summed levels (the paper uses 2 to 4 with SSIM).
        adapter: "conv1x1" (trainable, initialised to the identity where channels match),
            "auto" (a 1x1 convolution only where the widths differ) or "identity".
        **distance_options: passed to the distance, checked against its signature.

    ``forward(student_feats, teacher_feats)`` returns ``(total, per_level)`` where ``per_level``
    maps level names to the detached unweighted distances (for logging).
    """

    def __init__(
        self, student_channels: Mapping[str, int] | Sequence[int],
        teacher_channels: Mapping[str, int] | Sequence[int], *,
        distance: str | nn.Module = "ssim", weight: float = 1.0, adapter: str = "conv1x1",
        **distance_options,
    ) -> None:
        super().__init__()
        s_ch = _names_and_channels(student_channels, "student")
        t_ch = _names_and_channels(teacher_channels, "teacher")
        if list(s_ch) != list(t_ch):
            raise ValueError(
                f"student levels {list(s_ch)} and teacher levels {list(t_ch)} differ; "
                "pair the levels before building the loss"
            )
        if not weight >= 0:
            raise ValueError(f"weight={weight!r} must be >= 0")
        self.levels = list(s_ch)
        self.weight = float(weight)
        self.adapters = make_adapters({n: (s_ch[n], t_ch[n]) for n in self.levels}, adapter)
        if isinstance(distance, str):
            self.distance = build_distance(distance, **distance_options)
        else:
            if distance_options:
                raise ValueError("distance options are only accepted with a distance name")
            self.distance = distance

    def forward(
        self, student_feats: Features, teacher_feats: Features
    ) -> tuple[Tensor, dict[str, Tensor]]:
        s = _as_named(student_feats, "student")
        t = _as_named(teacher_feats, "teacher")
        missing = [n for n in self.levels if n not in s or n not in t]
        if missing:
            raise ValueError(
                f"levels {missing} are missing; expected student and teacher features for "
                f"{self.levels}, got student {list(s)} and teacher {list(t)}"
            )
        per_level: dict[str, Tensor] = {}
        total = None
        for name in self.levels:
            value = self.distance(self.adapters[name](s[name]), t[name].detach())
            per_level[name] = value.detach()
            total = value if total is None else total + value
        return self.weight * total, per_level
