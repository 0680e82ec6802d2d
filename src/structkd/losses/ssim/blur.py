"""The Gaussian blur of SSIM: a separable, per-channel operator with its exact adjoint.

Windows larger than a feature level are truncated per dimension to the largest odd size the
padding allows (``window_taps``) and renormalised. Short axes are blurred by a small dense matrix
(padding folded in), long ones by a depthwise convolution after reflect padding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_window

# Axes up to this length are blurred by a dense matrix product instead of a convolution.
MATMUL_MAX = 32


def gaussian_window(
    size: int, sigma: float, *, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """A normalised 1-D Gaussian of odd ``size`` taps."""
    check_window(size, sigma)
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def window_taps(dim: int, window_size: int, padding: str) -> int:
    """Taps used along a dimension of length ``dim`` (the window truncated to fit)."""
    if padding == "same":
        return min(window_size, 2 * dim - 1)
    return min(window_size, dim if dim % 2 else dim - 1)


class GaussianBlur:
    """Separable Gaussian blur of every channel for one spatial size, with its exact adjoint.

    An axis of up to ``MATMUL_MAX`` pixels is blurred by one small dense matrix (padding folded
    in) applied with a matrix product; a longer axis by a depthwise convolution after reflect
    padding. Small maps thus need no padded copies, and their adjoint is the transposed matrix.
    """

    def __init__(
        self, height: int, width: int, *, window_size: int, sigma: float, padding: str,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.padding = padding
        self.kh = window_taps(height, window_size, padding)
        self.kw = window_taps(width, window_size, padding)
        self.gh = _cached_window(self.kh, sigma, dtype, str(device))
        self.gw = _cached_window(self.kw, sigma, dtype, str(device))
        self.ph, self.pw = (self.kh // 2, self.kw // 2) if padding == "same" else (0, 0)
        key = (sigma, padding, dtype, str(device))
        small_h, small_w = self.kh > 1 and height <= MATMUL_MAX, self.kw > 1 and width <= MATMUL_MAX
        self.rh = blur_matrix(height, self.kh, *key) if small_h else None
        self.rw = blur_matrix(width, self.kw, *key) if small_w else None
        self._weights: dict[int, tuple[Tensor, Tensor]] = {}

    def _w(self, groups: int) -> tuple[Tensor, Tensor]:
        if groups not in self._weights:
            wh = self.gh.view(1, 1, -1, 1).expand(groups, 1, self.kh, 1).contiguous()
            ww = self.gw.view(1, 1, 1, -1).expand(groups, 1, 1, self.kw).contiguous()
            self._weights[groups] = (wh, ww)
        return self._weights[groups]

    def __call__(self, x: Tensor) -> Tensor:
        """Blur every channel of (B, G, H, W); "same" keeps H, W, "valid" shrinks them.

        Runs in the input's memory layout; channels-last is many times faster on CPU.
        """
        if self.kw > 1:  # one axis at a time: the W pass then skips the H border
            if self.rw is not None:
                x = _matmul_w(x, self.rw)
            else:
                x = reflect_pad(x, 0, self.pw) if self.pw else x
                x = F.conv2d(x, self._w(x.shape[1])[1], groups=x.shape[1])
        if self.kh > 1:
            if self.rh is not None:
                x = _matmul_h(x, self.rh)
            else:
                x = reflect_pad(x, self.ph, 0) if self.ph else x
                x = F.conv2d(x, self._w(x.shape[1])[0], groups=x.shape[1])
        return x

    def apply_adjoint(self, u: Tensor) -> Tensor:
        """The transpose of ``__call__``: maps an output-sized gradient to the input size."""
        if self.kh > 1:
            if self.rh is not None:
                u = _matmul_h(u, self.rh.T)
            else:
                u = F.conv2d(u, self._w(u.shape[1])[0], groups=u.shape[1],
                             padding=(self.kh - 1, 0))
                u = reflect_pad_adjoint(u, self.ph, 0) if self.ph else u
        if self.kw > 1:
            if self.rw is not None:
                u = _matmul_w(u, self.rw.T)
            else:
                u = F.conv2d(u, self._w(u.shape[1])[1], groups=u.shape[1],
                             padding=(0, self.kw - 1))
                u = reflect_pad_adjoint(u, 0, self.pw) if self.pw else u
        return u


@functools.lru_cache(maxsize=256)
def _cached_window(size: int, sigma: float, dtype: torch.dtype, device: str) -> Tensor:
    """``gaussian_window`` kept per device: no host-to-device copy in every step."""
    return gaussian_window(size, sigma, dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def blur_matrix(
    dim: int, taps: int, sigma: float, padding: str, dtype: torch.dtype, device: str
) -> Tensor:
    """The (out, dim) matrix of the 1-D blur along an axis of ``dim`` pixels, with reflect
    padding ("same", out = dim) folded in, or none ("valid", out = dim - taps + 1)."""
    g = gaussian_window(taps, sigma, dtype=torch.float64).tolist()
    p = taps // 2
    out = dim if padding == "same" else dim - taps + 1
    r = torch.zeros(out, dim, dtype=torch.float64)
    for i in range(out):
        for t in range(taps):
            j = i + t - p if padding == "same" else i + t
            j = -j if j < 0 else (2 * (dim - 1) - j if j >= dim else j)
            r[i, j] += g[t]
    return r.to(dtype=dtype, device=device)


def _matmul_w(x: Tensor, r: Tensor) -> Tensor:
    """``r`` (W', W) applied along the last axis of (N, C, H, W), keeping the layout."""
    n, c, h, w = x.shape
    if is_channels_last(x):  # memory (N, H, W, C): a batch of N*H (W, C) blocks
        y = torch.matmul(r, x.permute(0, 2, 3, 1).reshape(n * h, w, c))
        return y.view(n, h, -1, c).permute(0, 3, 1, 2)
    return torch.matmul(x, r.T)


def _matmul_h(x: Tensor, r: Tensor) -> Tensor:
    """``r`` (H', H) applied along the height axis of (N, C, H, W), keeping the layout."""
    n, c, h, w = x.shape
    if is_channels_last(x):  # memory (N, H, W, C): a batch of N (H, W*C) blocks
        y = torch.matmul(r, x.permute(0, 2, 3, 1).reshape(n, h, w * c))
        return y.view(n, -1, w, c).permute(0, 3, 1, 2)
    return torch.matmul(r, x)


def reflect_pad(x: Tensor, ph: int, pw: int) -> Tensor:
    """``F.pad(x, (pw, pw, ph, ph), mode="reflect")`` for ``ph < H``, ``pw < W``, in the layout of
    ``x``; differentiable. Built from slice copies because F.pad's channels-last kernel is about
    8x slower than these on CPU."""
    b, c, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty((b, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    out[:, :, ph : ph + h, pw : pw + w] = x
    if pw:
        out[:, :, ph : ph + h, :pw] = x[..., 1 : pw + 1].flip(-1)
        out[:, :, ph : ph + h, pw + w :] = x[..., w - pw - 1 : w - 1].flip(-1)
    if ph:  # rows reflect the already column-padded rows, so the corners come out right
        out[:, :, :ph] = out[:, :, ph + 1 : 2 * ph + 1].flip(-2)
        out[:, :, ph + h :] = out[:, :, h - 1 : h + ph - 1].flip(-2)
    return out


def reflect_pad_adjoint(u: Tensor, ph: int, pw: int) -> Tensor:
    """The transpose of ``reflect_pad``: folds the border of ``u`` back in (``u`` is modified)."""
    h, w = u.shape[-2] - 2 * ph, u.shape[-1] - 2 * pw
    if ph:
        u[:, :, ph + 1 : 2 * ph + 1] += u[:, :, :ph].flip(-2)
        u[:, :, h - 1 : h + ph - 1] += u[:, :, ph + h :].flip(-2)
    v = u[:, :, ph : ph + h]
    g = v[..., pw : pw + w].clone()
    if pw:
        g[..., 1 : pw + 1] += v[..., :pw].flip(-1)
        g[..., w - pw - 1 : w - 1] += v[..., pw + w :].flip(-1)
    return g


def is_channels_last(x: Tensor) -> bool:
    """True for a 4-D tensor stored channels-last (and not also plain contiguous)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not (
        x.is_contiguous()
    )
