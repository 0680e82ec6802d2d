"""Feature imitation with a distance: SSIM (de Rijk et al., NeurIPS 2022) and its L1 / L2 baselines.

    L = weight * sum over levels r of D(phi_r(S_r), T_r)

``phi_r`` is a trainable 1x1 convolution per level (identity-initialised where the widths match),
``D`` the mean over (C, H, W) of each image's valid region, averaged over the batch's images. With
no padding this is exactly ``FeatureDistillLoss`` (mean over (B, C, H, W)).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..losses import DISTANCES, build_distance
from ..losses.adapters import make_adapters
from .base import DistillContext, DistillMethod, Level, register_method

DISTANCE_ALIASES = {"ssim": {"distance": "ssim"}, "l1": {"distance": "l1"},
                    "mse": {"distance": "mse"}, "l2": {"distance": "mse"}}


@register_method("imitation", aliases=DISTANCE_ALIASES)
class FeatureImitation(DistillMethod):
    """Imitate the teacher's neck features under a distance: SSIM (structural), L1 or L2.

    Options: ``distance`` ("ssim", "l1", "mse"/"l2"), ``weight`` (lambda; the paper uses 2 to 4
    with SSIM), ``adapter`` ("conv1x1", "auto", "identity"), and the distance's own options
    (``structkd methods`` lists them; SSIM: window_size, sigma, k1, k2, padding, components,
    normalize). Aliases: ``ssim``, ``l1``, ``mse``/``l2``.
    """

    paper = ("de Rijk et al., Structural Knowledge Distillation for Object Detection, "
             "NeurIPS 2022 (arXiv 2211.13133)")

    def __init__(
        self, levels: Sequence[Level] | Mapping[str, Level], *, distance: str = "ssim",
        weight: float = 2.0, adapter: str = "conv1x1", **distance_options: Any,
    ) -> None:
        super().__init__(levels, weight=weight)
        if distance not in DISTANCES:
            raise ValueError(f"distance={distance!r} is invalid; expected one of "
                             f"{sorted(DISTANCES)}")
        # One finiteness check per step happens on the total loss; none per level here, which
        # would synchronise with the device once per level.
        if "check_finite" not in distance_options:
            distance_options["check_finite"] = False
        self.distance_name = distance
        self.distance = build_distance(distance, **distance_options)
        self.adapters = make_adapters(
            {n: (lv.student_channels, lv.teacher_channels) for n, lv in self.levels.items()},
            adapter,
        )

    @classmethod
    def extra_options(cls) -> dict[str, dict[str, Any]]:
        """Each distance's own options with their defaults (accepted as method options)."""
        out = {}
        for name, dist in DISTANCES.items():
            if name == "l2":  # the same distance as "mse"
                continue
            params = inspect.signature(dist.__init__).parameters
            out[name] = {k: p.default for k, p in params.items()
                         if k != "self" and p.kind is p.KEYWORD_ONLY}
        return out

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        self.check_context(ctx)
        total: Tensor | None = None
        for name in self.levels:
            s = self.adapters[name](ctx.student[name])
            value = ctx.mean_over_images(
                name, lambda s, t, g: self.distance(s, t.detach()), student=s)
            self.level_values[name] = value.detach()
            total = value if total is None else total + value
        assert total is not None
        return {"distill": self.weight * total}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, distance={self.distance_name!r}"
