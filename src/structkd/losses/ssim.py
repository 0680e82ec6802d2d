"""Structural (SSIM) feature distance of de Rijk et al., NeurIPS 2022.

``ssim_map`` is the reference formula with plain autograd. ``ssim_distance``/``SSIMLoss`` compute
the mean of ``(1 - SSIM) / 2`` with a fused kernel: channels are processed in cache-sized chunks,
min-max normalisation happens on the fly, and the analytic gradient is formed in the same pass, so
no full-size intermediate is kept besides the gradient itself.

Windows larger than a feature level (P7 is 7x11 for an 800x1333 image, 1x1 at small inputs) are
truncated per dimension to the largest odd size the padding allows: ``2 * dim - 1`` taps with
"same" (reflect) padding, ``dim`` (rounded down to odd) with "valid". The truncated Gaussian is
renormalised, so a 1-pixel dimension is not blurred at all. The loss stays finite, is zero for
identical maps and positive for different ones.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_pair, check_window
from .normalize import DEFAULT_EPS, NORMALIZE_MODES, MinMaxStats, minmax_normalize

PADDINGS = ("same", "valid")
# Elements of one quantity per chunk: on CPU, small enough to keep the ~16 live chunk tensors
# inside the caches; on GPUs, large enough that one chunk fills the device (few kernel launches).
CHUNK_ELEMENTS = 1 << 19
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26
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
    if _is_cl(x):  # memory (N, H, W, C): a batch of N*H (W, C) blocks
        y = torch.matmul(r, x.permute(0, 2, 3, 1).reshape(n * h, w, c))
        return y.view(n, h, -1, c).permute(0, 3, 1, 2)
    return torch.matmul(x, r.T)


def _matmul_h(x: Tensor, r: Tensor) -> Tensor:
    """``r`` (H', H) applied along the height axis of (N, C, H, W), keeping the layout."""
    n, c, h, w = x.shape
    if _is_cl(x):  # memory (N, H, W, C): a batch of N (H, W*C) blocks
        y = torch.matmul(r, x.permute(0, 2, 3, 1).reshape(n, h, w * c))
        return y.view(n, -1, w, c).permute(0, 3, 1, 2)
    return torch.matmul(r, x)


def reflect_pad(x: Tensor, ph: int, pw: int) -> Tensor:
    """``F.pad(x, (pw, pw, ph, ph), mode="reflect")`` for ``ph < H``, ``pw < W``, in the layout of
    ``x``; differentiable. Built from slice copies because F.pad's channels-last kernel is about
    8x slower than these on CPU."""
    b, c, h, w = x.shape
    out = torch.empty((b, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if _is_cl(x) else torch.contiguous_format)
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


def _is_cl(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not (
        x.is_contiguous()
    )


@dataclass(frozen=True)
class SSIMConfig:
    """SSIM constants; C1 = (k1 L)^2, C2 = (k2 L)^2, C3 = C2 / 2 with L = ``data_range``."""

    window_size: int = 11
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    data_range: float = 1.0
    padding: str = "same"
    components: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        check_window(self.window_size, self.sigma)
        check_choice("padding", self.padding, PADDINGS)
        if not self.data_range > 0:
            raise ValueError(f"data_range={self.data_range!r} must be > 0")
        for name, k in (("k1", self.k1), ("k2", self.k2)):
            if not k > 0:
                raise ValueError(f"{name}={k!r} must be > 0")
        comps = tuple(float(c) for c in self.components)
        if len(comps) != 3 or any(not c >= 0 or math.isinf(c) for c in comps):
            raise ValueError(
                f"components={self.components!r} must be three finite exponents >= 0 "
                "(luminance, contrast, structure)"
            )
        if comps == (0.0, 0.0, 0.0):
            raise ValueError("components=(0, 0, 0) leaves nothing to compare")
        object.__setattr__(self, "components", comps)

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
        h, w = x.shape[-2:]
        return GaussianBlur(
            h, w, window_size=self.window_size, sigma=self.sigma, padding=self.padding,
            dtype=x.dtype, device=x.device,
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def _moments(zx: Tensor, zy: Tensor, blur: GaussianBlur) -> tuple[Tensor, ...]:
    k = zx.shape[1]
    q = torch.cat([zx, zy, zx * zx, zy * zy, zx * zy], dim=1)
    return blur(q).split(k, dim=1)


def ssim_map(
    x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
    k2: float = 0.03, data_range: float = 1.0, padding: str = "same",
    components: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Tensor:
    """SSIM per channel and position, shape (B, C, H', W'), computed in fp32 (or fp64).

    ``components`` are the exponents of luminance, contrast and structure; (1, 1, 1) is the
    usual two-factor SSIM. The structure term keeps its sign: ``sign(s) * |s| ** gamma``.
    """
    cfg = SSIMConfig(window_size, sigma, k1, k2, data_range, padding, components)
    check_pair(x, y)
    dtype = _compute_dtype(x)
    with _no_autocast(x.device.type):
        x, y = x.to(dtype), y.to(dtype)
        return _ssim_map(x, y, cfg)


def _ssim_map(x: Tensor, y: Tensor, cfg: SSIMConfig) -> Tensor:
    a, b, g = cfg.components
    c1, c2 = cfg.c1, cfg.c2
    mu_x, mu_y, e_xx, e_yy, e_xy = _moments(x, y, cfg.blur(x))
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


def _chunk_size(x: Tensor) -> int:
    b, c, h, w = x.shape
    budget = CHUNK_ELEMENTS if x.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, min(c, budget // (b * h * w)))


def _fused_ssim(
    x: Tensor, y: Tensor, cfg: SSIMConfig, stats_x: MinMaxStats | None,
    stats_y: MinMaxStats | None, need_gx: bool, need_gy: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """mean((1 - SSIM) / 2) of min-max-normalised maps and, where asked, its gradients.

    Channels are processed in cache-sized chunks. Only four maps are blurred: z_x, z_y,
    z_x^2 + z_y^2 (SSIM needs var_x + var_y only, and the blur is linear) and z_x z_y. They are
    stacked along the *batch* axis of one channels-last tensor, so the depthwise blur runs once
    per chunk in its fast layout and every quantity is a dense block for the element-wise work.
    The gradient maps are formed the same way and pass through the blur's adjoint.
    """
    b, c, h, w = x.shape
    blur = cfg.blur(x)
    c1, c2 = cfg.c1, cfg.c2
    lum = cfg.components[0] == 1.0
    need_grad = need_gx or need_gy
    # Gradients in the caller's (contiguous) layout: min-max's argmin/argmax index into it.
    grad_x = x.new_empty(x.shape) if need_gx else None
    grad_y = y.new_empty(y.shape) if need_gy else None
    sums = {}
    for name, stats, grad in (("x", stats_x, grad_x), ("y", stats_y, grad_y)):
        if stats is not None and grad is not None:
            rows = (b, c) if stats.per_channel else (b,)
            sums[name] = (x.new_zeros(rows), x.new_zeros(rows))
    partial = []
    oh, ow = (h, w) if cfg.padding == "same" else (h - blur.kh + 1, w - blur.kw + 1)
    n_out = b * c * oh * ow
    scale = -1.0 / n_out  # d mean((1 - S) / 2) / dS, times 2 for the half-derivatives
    step = _chunk_size(x)
    for c0 in range(0, c, step):
        sl = slice(c0, min(c, c0 + step))
        k = sl.stop - sl.start
        q = _empty_cl(x, (4 * b, k, h, w))
        zx, zy, zsq, zxy = q.split(b)
        _normalise_into(zx, x[:, sl], stats_x, sl)
        _normalise_into(zy, y[:, sl], stats_y, sl)
        torch.mul(zx, zx, out=zsq).addcmul_(zy, zy)
        torch.mul(zx, zy, out=zxy)
        mu_x, mu_y, e_sq, e_xy = blur(q).split(b)  # fresh tensor: its blocks may be overwritten
        mu_xy = mu_x * mu_y
        mu_sq = (mu_x * mu_x).addcmul_(mu_y, mu_y)
        a2 = e_xy.sub_(mu_xy).mul_(2).add_(c2)  # 2 cov + C2
        b2 = e_sq.sub_(mu_sq).add_(c2)  # var_x + var_y + C2
        if lum:
            a1 = mu_xy.mul_(2).add_(c1)  # 2 mu_x mu_y + C1
            b1 = mu_sq.add_(c1)  # mu_x^2 + mu_y^2 + C1
            if need_grad:
                inv_b1, inv_b2 = b1.reciprocal_(), b2.reciprocal_()
                inv_den = inv_b1 * inv_b2
                s = (a1 * a2).mul_(inv_den)
            else:
                s = a1.mul_(a2).mul_(b1.mul_(b2).reciprocal_())
        else:
            inv_b2 = b2.reciprocal_()
            s = a2.mul_(inv_b2) if not need_grad else a2 * inv_b2
        partial.append(s.sum(dtype=torch.float64))
        if not need_grad:
            continue
        # Half-derivatives of S w.r.t. the blurred maps (the factor 2 goes into ``scale``):
        # mu_x -> h_a mu_y + h_b mu_x, E_sq -> -S / B2, E_xy -> h_xy.
        n_maps = 2 + need_gx + need_gy
        u = _empty_cl(x, (n_maps * b, k, *s.shape[-2:]))
        parts = list(u.split(b))
        m_sq, m_xy = parts[-2], parts[-1]
        torch.mul(s, inv_b2, out=m_sq)  # S / B2 (dS/dE_sq = -S / B2: a minus sign below)
        if lum:
            torch.mul(a1, inv_den, out=m_xy)  # A1 / (B1 B2)
            h_a = a2.sub_(a1).mul_(inv_den)  # (A2 - A1) / (B1 B2)
            h_b = torch.addcmul(m_sq, s, inv_b1, value=-1)  # S (1 / B2 - 1 / B1)
        else:
            m_xy.copy_(inv_b2)  # 1 / B2
            h_a = inv_b2.neg_()  # -1 / B2
            h_b = m_sq
        if need_gx:
            torch.mul(h_a, mu_y, out=parts[0]).addcmul_(h_b, mu_x)
        if need_gy:
            torch.mul(h_a, mu_x, out=parts[-3]).addcmul_(h_b, mu_y)
        adj = blur.apply_adjoint(u).split(b)
        g_sq, g_xy = adj[-2], adj[-1]
        if need_gx:
            gz = torch.addcmul(adj[0], zx, g_sq, value=-1).addcmul_(zy, g_xy)
            _store(grad_x, gz, zx, stats_x, sums.get("x"), sl, scale)
        if need_gy:
            gz = torch.addcmul(adj[-3], zy, g_sq, value=-1).addcmul_(zx, g_xy)
            _store(grad_y, gz, zy, stats_y, sums.get("y"), sl, scale)
    for grad, stats, name in ((grad_x, stats_x, "x"), (grad_y, stats_y, "y")):
        if grad is not None and stats is not None:
            sum_g, sum_gz = (t.mul_(scale).reshape(-1) for t in sums[name])
            stats.backward(grad, sum_g, sum_gz)
    total = torch.stack(partial).sum()
    return (0.5 - 0.5 * total / n_out).to(x.dtype), grad_x, grad_y


class _FusedSSIMDistance(torch.autograd.Function):
    """``_fused_ssim`` under autograd: the gradient is formed in the forward pass and scaled in
    the backward. Not twice differentiable: ``create_graph=True`` raises instead of silently
    dropping the second-order term."""

    @staticmethod
    def forward(ctx, x, y, cfg, stats_x, stats_y):  # type: ignore[override]
        loss, gx, gy = _fused_ssim(x, y, cfg, stats_x, stats_y, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(*(g for g in (gx, gy) if g is not None))
        ctx.has = (gx is not None, gy is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                "ssim_distance/SSIMLoss is not twice differentiable (create_graph=True); use "
                "ssim_map, which runs on plain autograd, for higher-order gradients"
            )
        saved = list(ctx.saved_tensors)
        gx = saved.pop(0) * grad_out if ctx.has[0] else None
        gy = saved.pop(0) * grad_out if ctx.has[1] else None
        return gx, gy, None, None, None


def _empty_cl(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def _normalise_into(out: Tensor, t: Tensor, stats: MinMaxStats | None, sl: slice) -> None:
    """Write the min-max-rescaled channel slice ``t`` into ``out`` (any layout)."""
    if stats is None:
        out.copy_(t)
    elif stats.per_channel:
        torch.addcmul(stats.shift[:, sl], t, stats.inv_range[:, sl], out=out)
    else:
        torch.addcmul(stats.shift, t, stats.inv_range, out=out)


def _store(grad: Tensor, gz: Tensor, z: Tensor, stats, sums, sl: slice, scale: float) -> None:
    """Write ``scale`` * dS/dz of a chunk into ``grad`` (one pass, which also converts the
    layout) and accumulate the unscaled row sums min-max's backward needs."""
    torch.mul(gz, scale, out=grad[:, sl])
    if stats is None:
        return
    sum_g, sum_gz = sums
    if stats.per_channel:
        sum_g[:, sl] += gz.sum(dim=(2, 3))
        sum_gz[:, sl] += (gz * z).sum(dim=(2, 3))
    else:  # a dot product per sample over flat views: no (gz * z) temporary
        cl = _is_cl(gz)  # both flattened in gz's memory order (views when z shares it)
        flat_g, flat_z = (_flat_rows(t, cl) for t in (gz, z))
        sum_g += flat_g.sum(dim=1)
        sum_gz += torch.linalg.vecdot(flat_g, flat_z)


def _flat_rows(t: Tensor, channels_last: bool) -> Tensor:
    """(B, C, H, W) as (B, C*H*W), flattened in (H, W, C) order for ``channels_last``."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(t.shape[0], -1)


def ssim_distance(
    student: Tensor, teacher: Tensor, *, normalize: str | None = "minmax",
    eps: float = DEFAULT_EPS, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
    k2: float = 0.03, data_range: float = 1.0, padding: str = "same",
    components: tuple[float, float, float] = (1.0, 1.0, 1.0), check_finite: bool = True,
) -> Tensor:
    """Mean of ``(1 - SSIM) / 2`` between two (B, C, H, W) maps, after min-max rescaling.

    The result is in [0, 1]; 0 for identical maps. Computed and returned in fp32 (fp64 for fp64
    inputs) even under autocast or with bf16/fp16 inputs.
    """
    cfg = SSIMConfig(window_size, sigma, k1, k2, data_range, padding, components)
    return _ssim_distance(student, teacher, cfg, normalize, eps, check_finite)


def _ssim_distance(
    student: Tensor, teacher: Tensor, cfg: SSIMConfig, normalize: str | None, eps: float,
    check_finite: bool,
) -> Tensor:
    check_choice("normalize", normalize, NORMALIZE_MODES)
    # With min-max on, non-finite values show up in the extremes, so skip the full scan.
    check_pair(student, teacher, check_finite=check_finite and normalize is None)
    dtype = _compute_dtype(student)
    with _no_autocast(student.device.type):
        x = student.to(dtype).contiguous()
        y = teacher.to(dtype).contiguous()
        if not cfg.fused:
            zx, zy = minmax_normalize(x, normalize, eps), minmax_normalize(y, normalize, eps)
            if check_finite and normalize is not None:
                _check_finite_pair(zx, zy)
            return ((1 - _ssim_map(zx, zy, cfg)) / 2).mean()
        grads = [torch.is_grad_enabled() and t.requires_grad for t in (x, y)]
        stats = [None, None]
        if normalize is not None:
            with torch.no_grad():
                stats = [MinMaxStats.of(t, normalize, eps, index=g)
                         for t, g in zip((x, y), grads, strict=True)]
            if check_finite:
                _check_finite_stats(stats)
        if any(grads):
            return _FusedSSIMDistance.apply(x, y, cfg, *stats)
        return _fused_ssim(x, y, cfg, *stats, False, False)[0]  # no gradient work


def _check_finite_stats(stats: list[MinMaxStats]) -> None:
    for name, s in zip(("student", "teacher"), stats, strict=True):
        if not bool(torch.isfinite(s.low).all() & torch.isfinite(s.high).all()):
            raise ValueError(f"{name} contains NaN or Inf values")


def _check_finite_pair(zx: Tensor, zy: Tensor) -> None:
    for name, z in (("student", zx), ("teacher", zy)):
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"{name} contains NaN or Inf values")


class SSIMLoss(nn.Module):
    """Structural distance ``mean((1 - SSIM) / 2)`` between student and teacher feature maps.

    ``normalize`` rescales each map to [0, 1] with its own statistics: per sample over (C, H, W)
    ("minmax", the default), per sample and channel ("minmax_channel"), or not at all (None;
    then set ``data_range`` to the features' dynamic range).
    """

    def __init__(
        self, *, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
        data_range: float = 1.0, padding: str = "same",
        components: tuple[float, float, float] = (1.0, 1.0, 1.0),
        normalize: str | None = "minmax", eps: float = DEFAULT_EPS, check_finite: bool = True,
    ) -> None:
        super().__init__()
        check_choice("normalize", normalize, NORMALIZE_MODES)
        self.config = SSIMConfig(window_size, sigma, k1, k2, data_range, padding, components)
        self.normalize = normalize
        self.eps = eps
        self.check_finite = check_finite

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _ssim_distance(
            student, teacher, self.config, self.normalize, self.eps, self.check_finite
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"window_size={c.window_size}, sigma={c.sigma}, padding={c.padding!r}, "
            f"components={c.components}, normalize={self.normalize!r}"
        )
