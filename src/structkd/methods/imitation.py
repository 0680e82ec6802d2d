"""Feature imitation with a distance: SSIM (de Rijk et al., NeurIPS 2022) and its L1 / L2 baselines.

    L = weight * sum over levels r of D(phi_r(S_r), T_r)

``phi_r`` is a trainable 1x1 convolution per level (identity-initialised where the widths match),
``D`` the mean over (C, H, W) of each image's valid region, averaged over the batch's images
(with no padding: the mean over (B, C, H, W), the paper's definition).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..checks import check_choice
from ..losses import DISTANCES, build_distance, distance_options
from .base import DistillMethod
from .context import DistillContext, Level
from .registry import register_method

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
        check_choice("distance", distance, sorted(DISTANCES))
        # The distance validates its own option names and values (one place). One finiteness
        # check per step happens on the total loss; none per level here, which would
        # synchronise with the device once per level.
        distance_options.setdefault("check_finite", False)
        built = build_distance(distance, **distance_options)
        super().__init__(levels, weight=weight, adapter=adapter)
        self.distance_name = distance
        self.distance = built

    @classmethod
    def extra_options(cls) -> dict[str, dict[str, Any]]:
        """Each distance's own options with their defaults (accepted as method options)."""
        return {name: {k: v for k, v in distance_options(name).items() if k != "check_finite"}
                for name in DISTANCES if name != "l2"}  # "l2" is "mse"

    def level_loss(self, name: str, student: Tensor, teacher: Tensor,
                   ctx: DistillContext) -> Tensor:
        return ctx.mean_over_images(name, lambda s, t, g: self.distance(s, t), student=student)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, distance={self.distance_name!r}"
