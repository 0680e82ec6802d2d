"""``SSIMOptions``: every option of the SSIM distance, declared once with its default and checks.

``ssim_distance``, ``ssim_map`` and ``SSIMLoss`` take these fields as keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...checks import check_choice
from .._checks import check_number, check_window
from ..options import NormalizeOptions
from .blur import GaussianBlur

PADDINGS = ("same", "valid")


@dataclass(frozen=True, kw_only=True)
class SSIMOptions(NormalizeOptions):
    """SSIM constants and the normalisation of ``NormalizeOptions`` (normalize, eps, check_finite).

    C1 = (k1 L)^2, C2 = (k2 L)^2, C3 = C2 / 2 with L = ``data_range``. ``window_size`` taps of a
    Gaussian of std ``sigma`` (truncated on small levels), ``padding`` "same" (reflect) or "valid".
    ``components`` are the exponents of luminance, contrast and structure; (1, 1, 1) is the usual
    two-factor SSIM. With ``normalize=None`` set ``data_range`` to the features' dynamic range.
    """

    label: ClassVar[str] = "the SSIM distance"

    window_size: int = 11
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    data_range: float = 1.0
    padding: str = "same"
    components: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("k1", "k2", "data_range"):
            check_number(name, getattr(self, name))
        check_window(self.window_size, self.sigma)
        check_choice("padding", self.padding, PADDINGS)
        if not self.data_range > 0:
            raise ValueError(f"data_range={self.data_range!r} must be > 0")
        for name, k in (("k1", self.k1), ("k2", self.k2)):
            if not k > 0:
                raise ValueError(f"{name}={k!r} must be > 0")
        numbers = isinstance(self.components, list | tuple) and all(
            isinstance(c, int | float) and not isinstance(c, bool) for c in self.components)
        comps = tuple(float(c) for c in self.components) if numbers else ()
        if len(comps) != 3 or any(not c >= 0 or math.isinf(c) for c in comps):
            raise ValueError(
                f"components={self.components!r} must be three finite exponents >= 0 "
                "(luminance, contrast, structure)"
            )
        if comps == (0.0, 0.0, 0.0):
            raise ValueError("components=(0, 0, 0) leaves nothing to compare")
        object.__setattr__(self, "components", comps)
        super().__post_init__()

    @property
    def c1(self) -> float:
        return (self.k1 * self.data_range) ** 2

    @property
    def c2(self) -> float:
        return (self.k2 * self.data_range) ** 2

    @property
    def fused(self) -> bool:
        """True where the fused kernel applies: standard SSIM, or contrast x structure."""
        return self.components in ((1.0, 1.0, 1.0), (0.0, 1.0, 1.0))

    def blur(self, x: Tensor) -> GaussianBlur:
        """The blur operator for the spatial size, dtype and device of ``x``."""
        h, w = x.shape[-2:]
        return GaussianBlur(
            h, w, window_size=self.window_size, sigma=self.sigma, padding=self.padding,
            dtype=x.dtype, device=x.device,
        )
