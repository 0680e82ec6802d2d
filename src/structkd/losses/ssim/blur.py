"""The Gaussian blur of SSIM: a separable, per-channel operator with its exact adjoint.

Windows larger than a feature level are truncated per dimension to the largest odd size the
padding allows (``window_taps``) and renormalised. Short axes are blurred by a small dense matrix
(padding folded in), long ones by a zero-padded depthwise convolution whose border is then
corrected for the reflected taps (``border_matrix``): no padded copy of the maps is made.
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
    in) applied with a matrix product; a longer axis by a depthwise convolution. With "same"
    padding that convolution zero-pads (mkldnn pads for free, a reflect-padded copy costs as much
    as the convolution on CPU) and the ``p = taps // 2`` border pixels at each end then receive the
    reflected taps from a (p, p) matrix product. The adjoint is the same zero-padded convolution
    (the window is symmetric) plus the transposed border products.
    """

    def __init__(
        self, height: int, width: int, *, window_size: int, sigma: float, padding: str,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.padding, self.sigma = padding, sigma
        self.height, self.width = height, width
        self.kh = window_taps(height, window_size, padding)
        self.kw = window_taps(width, window_size, padding)
        self.gh = _cached_window(self.kh, sigma, dtype, str(device))
        self.gw = _cached_window(self.kw, sigma, dtype, str(device))
        self.ph, self.pw = (self.kh // 2, self.kw // 2) if padding == "same" else (0, 0)
        key = (sigma, padding, dtype, str(device))
        small_h, small_w = self.kh > 1 and height <= MATMUL_MAX, self.kw > 1 and width <= MATMUL_MAX
        self.rh = blur_matrix(height, self.kh, *key) if small_h else None
        self.rw = blur_matrix(width, self.kw, *key) if small_w else None
        same = padding == "same"
        self.bh = border_matrix(self.kh, sigma, dtype, str(device)) if same else None
        self.bw = border_matrix(self.kw, sigma, dtype, str(device)) if same else None
        self._weights: dict[int, tuple[Tensor, Tensor]] = {}

    def _w(self, groups: int) -> tuple[Tensor, Tensor]:
        if groups not in self._weights:
            wh = self.gh.view(1, 1, -1, 1).expand(groups, 1, self.kh, 1).contiguous()
            ww = self.gw.view(1, 1, 1, -1).expand(groups, 1, 1, self.kw).contiguous()
            self._weights[groups] = (wh, ww)
        return self._weights[groups]

    def __call__(self, x: Tensor, buffers: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Blur every channel of (B, G, H, W); "same" keeps H, W, "valid" shrinks them.

        Runs in the input's memory layout; channels-last is many times faster on CPU.
        ``buffers``: two flat scratch tensors, each at least ``x.numel()`` long, that the
        convolutions may write into instead of fresh memory (see ``conv_into``); the result may
        then be a view of either, valid until they are reused.
        """
        bufs = _Buffers(buffers)
        if self.kw > 1:  # one axis at a time: the W pass then skips the H border
            x = _matmul_w(x, self.rw) if self.rw is not None else self._conv(x, -1, False, bufs)
        if self.kh > 1:
            x = _matmul_h(x, self.rh) if self.rh is not None else self._conv(x, -2, False, bufs)
        return x

    def apply_adjoint(self, u: Tensor, buffers: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The transpose of ``__call__``: maps an output-sized gradient to the input size.

        ``buffers`` as for ``__call__``, each at least as long as the input-sized result.
        """
        bufs = _Buffers(buffers)
        if self.kh > 1:
            u = _matmul_h(u, self.rh.T) if self.rh is not None else self._conv(u, -2, True, bufs)
        if self.kw > 1:
            u = _matmul_w(u, self.rw.T) if self.rw is not None else self._conv(u, -1, True, bufs)
        return u

    def _conv(self, x: Tensor, axis: int, adjoint: bool, bufs: _Buffers) -> Tensor:
        """The 1-D blur along ``axis`` (-1: W, -2: H) by depthwise convolution, or its adjoint."""
        wh, ww = self._w(x.shape[1])
        taps, weight, border = (self.kw, ww, self.bw) if axis == -1 else (self.kh, wh, self.bh)
        # "valid": the adjoint is the full convolution; "same": zero padding, border added below
        p = taps // 2 if border is not None else (taps - 1 if adjoint else 0)
        shape = list(x.shape)
        shape[axis] += 2 * p - taps + 1
        y = conv_into(x, weight, (0, p) if axis == -1 else (p, 0), bufs.next(shape))
        if border is not None:
            add_reflected_border(y, x, border, axis, adjoint=adjoint)
        return y


class _Buffers:
    """Hands out a caller's two flat scratch buffers in turn, as channels-last views of the
    requested shape (None where the caller gave none, or a buffer is too short)."""

    def __init__(self, buffers: tuple[Tensor, Tensor] | None) -> None:
        self.buffers, self.i = buffers, 0

    def next(self, shape: list[int]) -> Tensor | None:
        if self.buffers is None:
            return None
        buf = self.buffers[self.i % 2]
        self.i += 1
        n, c, h, w = shape
        if buf.numel() < n * c * h * w:
            return None
        return buf[: n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)


def conv_into(x: Tensor, weight: Tensor, padding: tuple[int, int], out: Tensor | None) -> Tensor:
    """``F.conv2d(x, weight, padding=padding, groups=C)``, written into ``out`` where it can be.

    A fresh multi-MiB output is returned to the OS when freed and page-faulted back in by the
    next call, which on CPU costs more than the convolution itself; mkldnn's in-place
    convolution-plus-add into a zeroed ``out`` avoids that. Used for float32 channels-last
    tensors that need no autograd; elsewhere, or if that (private) operator fails, the plain
    convolution (the results are the same: the same kernel, plus zero).
    """
    groups = x.shape[1]
    if out is not None and _inplace_ok(x, out):
        try:
            out.zero_()
            return _MKLDNN_INPLACE[1](out, x, weight, None, list(padding), [1, 1], [1, 1],
                                      groups, "add", None, None, [], None)
        except (RuntimeError, TypeError, NotImplementedError):  # pragma: no cover - build specific
            _MKLDNN_INPLACE[0] = False
    return F.conv2d(x, weight, groups=groups, padding=padding)


def _find_inplace_conv() -> list:
    """[usable, op]: mkldnn's in-place convolution with a fused add, where this build has it."""
    try:
        op = torch.ops.mkldnn._convolution_pointwise_.binary
        return [bool(torch.backends.mkldnn.is_available()), op]
    except (AttributeError, RuntimeError):  # pragma: no cover - build specific
        return [False, None]


_MKLDNN_INPLACE = _find_inplace_conv()


def _inplace_ok(x: Tensor, out: Tensor) -> bool:
    return (
        _MKLDNN_INPLACE[0] and x.dtype == torch.float32 and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
        and is_channels_last(x) and is_channels_last(out)
    )


@functools.lru_cache(maxsize=256)
def border_matrix(taps: int, sigma: float, dtype: torch.dtype, device: str) -> Tensor:
    """The (p, p) matrix, ``p = taps // 2``, of the taps that reflect padding adds at the low end
    of an axis to a zero-padded blur: ``out[i] += sum_j A[i, j] x[1 + j]``. Entry (i, j) is
    ``g[p - 1 - i - j]`` where ``i + j < p``. The high end uses ``A`` flipped on both axes."""
    g = gaussian_window(taps, sigma, dtype=torch.float64).tolist()
    p = taps // 2
    a = torch.zeros(p, p, dtype=torch.float64)
    for i in range(p):
        for j in range(p - i):
            a[i, j] = g[p - 1 - i - j]
    return a.to(dtype=dtype, device=device)


def add_reflected_border(y: Tensor, x: Tensor, a: Tensor, axis: int, *, adjoint: bool) -> None:
    """Add to ``y`` (in place) what reflect padding contributes beyond zero padding along
    ``axis`` (-1 or -2) of ``x``, given ``a = border_matrix(...)``; or, with ``adjoint``, the
    transpose of that: the gradient the reflected pixels send back to the pixels they copy."""
    p, n = a.shape[0], x.shape[axis]
    if p == 0:
        return
    lo, hi = (a.T, a.flip(0, 1).T) if adjoint else (a, a.flip(0, 1))
    # (source start, target start) of the low and the high strip, each p pixels long
    src_lo, dst_lo = (0, 1) if adjoint else (1, 0)
    src_hi, dst_hi = (n - p, n - p - 1) if adjoint else (n - p - 1, n - p)
    for m, src, dst in ((lo, src_lo, dst_lo), (hi, src_hi, dst_hi)):
        _strip_add(y, x, m, axis, src, dst, p)


def _strip_add(y: Tensor, x: Tensor, m: Tensor, axis: int, src: int, dst: int, p: int) -> None:
    """``y[axis: dst:dst+p] += m @ x[axis: src:src+p]``, in the layout of ``x``."""
    if is_channels_last(x):  # memory (N, H, W, C): matrix products on (p, C) or (p, W*C) blocks
        xs = x.permute(0, 2, 3, 1).narrow(axis - 1, src, p)
        ys = y.permute(0, 2, 3, 1).narrow(axis - 1, dst, p)
        if axis == -1:  # (N, H, p, C); einsum is ~4x faster here than matmul's (p, C) batches
            ys.add_(torch.einsum("ij,nhjc->nhic", m, xs))
        else:  # (N, p, W, C) -> (N, p, W*C): a batch of (p, W*C) blocks
            ys.add_(torch.matmul(m, xs.flatten(2, 3)).view(ys.shape))
    elif axis == -1:
        y.narrow(-1, dst, p).add_(torch.matmul(x.narrow(-1, src, p), m.T))
    else:
        y.narrow(-2, dst, p).add_(torch.matmul(m, x.narrow(-2, src, p)))


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
