"""Structural (SSIM) feature distance of de Rijk et al., NeurIPS 2022.

``ssim_map`` is the reference formula with plain autograd (``autograd``). ``ssim_distance`` /
``SSIMLoss`` compute the mean of ``(1 - SSIM) / 2`` with a fused kernel (``fused``): channels are
processed in cache-sized chunks, min-max normalisation happens on the fly, and the analytic
gradient is formed in the same pass, so no full-size intermediate is kept besides the gradient
itself. All three take the fields of ``SSIMOptions`` (``options``) as keyword arguments.
The fused kernel's chunk steps run eagerly (``eager_kernels``, the reference) or, opted in with
``set_compile(True)`` or STRUCTKD_SSIM_COMPILE=1, through torch.compile (``compiled_kernels``).

Windows larger than a feature level (P7 is 7x11 for an 800x1333 image, 1x1 at small inputs) are
truncated per dimension to the largest odd size the padding allows (``blur``): ``2 * dim - 1``
taps with "same" (reflect) padding, ``dim`` (rounded down to odd) with "valid". The truncated
Gaussian is renormalised, so a 1-pixel dimension is not blurred at all. The loss stays finite, is
zero for identical maps and positive for different ones.
"""

from .autograd import ssim_map
from .blur import (
    GaussianBlur,
    blur_matrix,
    gaussian_window,
    reflect_pad,
    reflect_pad_adjoint,
    window_taps,
)
from .compiled_kernels import set_compile
from .distance import SSIMLoss, ssim_distance
from .options import PADDINGS, SSIMOptions

__all__ = [
    "PADDINGS",
    "GaussianBlur",
    "SSIMLoss",
    "SSIMOptions",
    "blur_matrix",
    "gaussian_window",
    "reflect_pad",
    "reflect_pad_adjoint",
    "set_compile",
    "ssim_distance",
    "ssim_map",
    "window_taps",
]
