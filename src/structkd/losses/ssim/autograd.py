"""The reference SSIM formula with plain autograd: ``ssim_map`` and the general-exponent path.

Separate luminance, contrast and structure terms (C3 = C2 / 2); with exponents (1, 1, 1) the
contrast and structure terms collapse to the classic ratio ``(2 cov + C2) / (var_x + var_y + C2)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...precision import compute_dtype, no_autocast
from .._checks import check_pair
from ..normalize import minmax_normalize
from .blur import GaussianBlur
from .options import SSIMOptions

# ``ssim_map`` compares the maps as given unless asked to rescale them.
MAP_DEFAULTS: dict[str, Any] = {"normalize": None}


def _moments(zx: Tensor, zy: Tensor, blur: GaussianBlur) -> tuple[Tensor, ...]:
    k = zx.shape[1]
    q = torch.cat([zx, zy, zx * zx, zy * zy, zx * zy], dim=1)
    return blur(q).split(k, dim=1)


@SSIMOptions.takes_options("x", "y", **MAP_DEFAULTS)
def ssim_map(x: Tensor, y: Tensor, **options: Any) -> Tensor:
    """SSIM per channel and position, shape (B, C, H', W'), computed in fp32 (or fp64).

    ``options`` are the fields of ``SSIMOptions``. ``components`` are the exponents of
    luminance, contrast and structure; (1, 1, 1) is the usual two-factor SSIM. The structure term
    keeps its sign: ``sign(s) * |s| ** gamma``. The maps are compared as given (``normalize``
    defaults to None here); with ``normalize`` set, each is min-max rescaled first, and
    ``((1 - ssim_map) / 2).mean()`` is ``ssim_distance`` with the same options.
    """
    opts = SSIMOptions.from_kwargs(**{**MAP_DEFAULTS, **options})
    check_pair(x, y, check_finite=opts.check_finite)
    dtype = compute_dtype(x)
    with no_autocast(x.device.type):
        x, y = x.to(dtype), y.to(dtype)
        if opts.normalize is not None:
            x = minmax_normalize(x, opts.normalize, opts.eps)
            y = minmax_normalize(y, opts.normalize, opts.eps)
        return ssim_formula(x, y, opts)


def ssim_formula(x: Tensor, y: Tensor, opts: SSIMOptions) -> Tensor:
    """The SSIM map of two checked, upcast (and possibly rescaled) maps."""
    a, b, g = opts.components
    c1, c2 = opts.c1, opts.c2
    mu_x, mu_y, e_xx, e_yy, e_xy = _moments(x, y, opts.blur(x))
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    out = torch.ones_like(mu_x)
    if a:
        lum = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
        out = lum if a == 1 else lum.pow(a)
    if b == 1 and g == 1:  # c * s collapses to one ratio when C3 = C2 / 2
        return out * (2 * cov + c2) / (var_x + var_y + c2)
    sd_x = var_x.clamp_min(1e-12).sqrt()
    sd_y = var_y.clamp_min(1e-12).sqrt()
    if b:
        con = (2 * sd_x * sd_y + c2) / (var_x + var_y + c2)
        out = out * (con if b == 1 else con.pow(b))
    if g:
        c3 = c2 / 2
        st = (cov + c3) / (sd_x * sd_y + c3)
        out = out * (st if g == 1 else st.sign() * st.abs().pow(g))
    return out
