"""The fused SSIM distance kernel: value and analytic gradient in one chunked pass.

``fused_ssim`` computes mean((1 - SSIM) / 2) of min-max-rescaled maps for the exponents (1, 1, 1)
and (0, 1, 1). Channels are processed in cache-sized chunks, min-max normalisation happens on the
fly, and the gradient is formed in the same pass, so no full-size intermediate is kept besides
the gradient itself. ``FusedSSIMDistance`` puts it under autograd.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..normalize import MinMaxStats
from .blur import is_channels_last
from .options import SSIMOptions

# Elements of one quantity per chunk: on CPU, small enough to keep the ~16 live chunk tensors
# inside the caches; on GPUs, large enough that one chunk fills the device (few kernel launches).
CHUNK_ELEMENTS = 1 << 19
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


# Chunks of at least this many channels are rounded to a multiple of it: the channels-last
# depthwise convolution vectorises over channels (AVX-512: 16 floats), and 17 channels take
# about three times as long as 16.
CHANNEL_ALIGN = 16


def _chunk_size(x: Tensor) -> int:
    b, c, h, w = x.shape
    budget = CHUNK_ELEMENTS if x.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    step = budget / (b * h * w)
    if step >= CHANNEL_ALIGN / 2:  # the nearest multiple: 0.75x to 2x the budget
        return min(c, CHANNEL_ALIGN * max(1, round(step / CHANNEL_ALIGN)))
    return max(1, min(c, int(step)))


def fused_ssim(
    x: Tensor, y: Tensor, cfg: SSIMOptions, stats_x: MinMaxStats | None,
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
    # Chunk buffers (the maps, the blur's two scratch buffers, the gradient maps) are carved from
    # one workspace, kept between calls on CPU (``_workspace``): fresh multi-MiB blocks are
    # returned to the OS when freed and page-faulted back in, which costs as much as the
    # arithmetic on CPU.
    n_maps = 2 + need_gx + need_gy
    m_in, m_out = b * min(c, step) * h * w, b * min(c, step) * oh * ow
    ws = _workspace(x, 12 * m_in + (n_maps * m_out if need_grad else 0))
    ws_q, ws_a, ws_b, ws_u = ws.split([4 * m_in, 4 * m_in, 4 * m_in, ws.numel() - 12 * m_in])
    ws_blur = (ws_a, ws_b)
    kernels = _kernels(x, b * min(c, step) * oh * ow)
    for c0 in range(0, c, step):
        sl = slice(c0, min(c, c0 + step))
        k = sl.stop - sl.start
        q = _cl_view(ws_q, (4 * b, k, h, w))
        zx, zy = q[:b], q[b : 2 * b]
        kernels.prep(x[:, sl], y[:, sl], _affine(stats_x, sl), _affine(stats_y, sl), q)
        blurred = blur(q, ws_blur)  # not q: its blocks may be overwritten
        u = _cl_view(ws_u, (n_maps * b, k, oh, ow)) if need_grad else None
        partial.append(kernels.terms(blurred, u, b, c1, c2, lum, need_gx, need_gy))
        if u is None:
            continue
        adj = blur.apply_adjoint(u, ws_blur)
        g_sq, g_xy = adj[-2 * b : -b], adj[-b:]
        for grad, z, z_other, stats, name, i in (
            (grad_x, zx, zy, stats_x, "x", 0), (grad_y, zy, zx, stats_y, "y", need_gx)
        ):
            if grad is None:
                continue
            factor = scale if stats is None else (
                stats.inv_range[:, sl] if stats.per_channel else stats.inv_range) * scale
            row_sums = kernels.grad(adj[i * b : (i + 1) * b], g_sq, g_xy, z, z_other,
                                    grad[:, sl], factor, None if stats is None else
                                    stats.per_channel)
            if row_sums is not None:
                sum_g, sum_gz = sums[name]
                target = (slice(None), sl) if stats.per_channel else (slice(None),)
                sum_g[target] += row_sums[0]
                sum_gz[target] += row_sums[1]
    for grad, stats, name in ((grad_x, stats_x, "x"), (grad_y, stats_y, "y")):
        if grad is not None and stats is not None:
            sum_g, sum_gz = (t.mul_(scale).reshape(-1) for t in sums[name])
            stats.backward(grad, sum_g, sum_gz, scaled=True)
    total = torch.stack(partial).sum()
    return (0.5 - 0.5 * total / n_out).to(x.dtype), grad_x, grad_y


class FusedSSIMDistance(torch.autograd.Function):
    """``fused_ssim`` under autograd: the gradient is formed in the forward pass and scaled in
    the backward. Not twice differentiable: ``create_graph=True`` raises instead of silently
    dropping the second-order term."""

    @staticmethod
    def forward(ctx, x, y, cfg, stats_x, stats_y):  # type: ignore[override]
        loss, gx, gy = fused_ssim(x, y, cfg, stats_x, stats_y, *ctx.needs_input_grad[:2])
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
        gx = _times(saved.pop(0), grad_out) if ctx.has[0] else None
        gy = _times(saved.pop(0), grad_out) if ctx.has[1] else None
        return gx, gy, None, None, None


def _times(grad: Tensor, grad_out: Tensor) -> Tensor:
    """``grad * grad_out``, skipping the full-size product (and its fresh allocation, whose page
    faults cost as much again on CPU) when ``grad_out`` is 1 on the CPU, the common case of an
    unweighted loss; checking on an accelerator would synchronise, so there it always multiplies.
    Returning the saved tensor itself is safe: autograd copies it before accumulating into a
    ``.grad`` while the graph (with retain_graph) still holds it."""
    if grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0:
        return grad
    return grad * grad_out


def _cl_view(workspace: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """A channels-last (N, C, H, W) tensor of ``shape`` over the start of a flat workspace."""
    assert workspace is not None
    n, c, h, w = shape
    return workspace[: n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)


_WORKSPACE = threading.local()


def _workspace(x: Tensor, n: int) -> Tensor:
    """A flat scratch tensor of ``n`` elements of ``x``'s dtype. On CPU one per thread is kept
    and grown as needed (about 30 MiB for RetinaNet levels at batch 2), so that the chunk
    buffers are not page-faulted in again at every call; elsewhere a fresh one (the caching
    allocators of accelerators keep their blocks anyway)."""
    if x.device.type != "cpu":
        return x.new_empty(n)
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.dtype != x.dtype or buf.numel() < n:
        buf = None  # free the old one first
        _WORKSPACE.buf = buf = x.new_empty(n)
    return buf[:n]


def _affine(stats: MinMaxStats | None, sl: slice) -> tuple[Tensor, Tensor] | None:
    """(shift, scale) of min-max for the channel slice ``sl``: ``z = shift + x * scale``."""
    if stats is None:
        return None
    if stats.per_channel:
        return stats.shift[:, sl], stats.inv_range[:, sl]
    return stats.shift, stats.inv_range


class _Eager:
    """The element-wise steps of one chunk in eager PyTorch, in place where possible: the
    reference for ``_Compiled`` and its fallback."""

    @staticmethod
    def prep(xs: Tensor, ys: Tensor, ax: tuple[Tensor, Tensor] | None,
             ay: tuple[Tensor, Tensor] | None, q: Tensor) -> None:
        """Fill ``q`` (4B, k, H, W) with z_x, z_y, z_x^2 + z_y^2 and z_x z_y (z: min-max'd)."""
        b = xs.shape[0]
        zx, zy, zsq, zxy = q.split(b)
        for out, t, aff in ((zx, xs, ax), (zy, ys, ay)):
            if aff is None:
                out.copy_(t)
            else:
                torch.addcmul(aff[0], t, aff[1], out=out)
        torch.mul(zx, zx, out=zsq).addcmul_(zy, zy)
        torch.mul(zx, zy, out=zxy)

    @staticmethod
    def terms(blurred: Tensor, u: Tensor | None, b: int, c1: float, c2: float, lum: bool,
              need_gx: bool, need_gy: bool) -> Tensor:
        """The chunk's sum of SSIM (float64) from the blurred maps (overwritten), and, into
        ``u`` (rows: [mu_x term], [mu_y term], E_sq term, E_xy term), the half-derivatives of
        SSIM w.r.t. the blurred maps (the factor 2 goes into the caller's ``scale``)."""
        mu_x, mu_y, e_sq, e_xy = blurred.split(b)
        mu_xy = mu_x * mu_y
        mu_sq = (mu_x * mu_x).addcmul_(mu_y, mu_y)
        a2 = e_xy.sub_(mu_xy).mul_(2).add_(c2)  # 2 cov + C2
        b2 = e_sq.sub_(mu_sq).add_(c2)  # var_x + var_y + C2
        need_grad = u is not None
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
        total = s.sum(dtype=torch.float64)
        if u is None:
            return total
        # mu_x -> h_a mu_y + h_b mu_x, E_sq -> -S / B2, E_xy -> h_xy.
        parts = list(u.split(b))
        m_sq, m_xy = parts[-2], parts[-1]
        torch.mul(s, inv_b2, out=m_sq)  # S / B2 (dS/dE_sq = -S / B2: a minus sign later)
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
        return total

    @staticmethod
    def grad(adj: Tensor, g_sq: Tensor, g_xy: Tensor, z: Tensor, z_other: Tensor, out: Tensor,
             factor: Tensor | float, per_channel: bool | None) -> tuple[Tensor, Tensor] | None:
        """Write ``factor`` * dS/dz into ``out`` (one pass, which also converts the layout;
        ``MinMaxStats.backward(scaled=True)`` then skips its own product) and return the row
        sums of dS/dz and dS/dz * z that min-max's backward needs (None without min-max)."""
        gz = torch.addcmul(adj, z, g_sq, value=-1).addcmul_(z_other, g_xy)
        torch.mul(gz, factor, out=out)
        if per_channel is None:
            return None
        if per_channel:
            return gz.sum(dim=(2, 3)), (gz * z).sum(dim=(2, 3))
        # a dot product per sample over flat views: no (gz * z) temporary
        cl = is_channels_last(gz)  # both flattened in gz's memory order (views when z shares it)
        flat_g, flat_z = (_flat_rows(t, cl) for t in (gz, z))
        return flat_g.sum(dim=1), torch.linalg.vecdot(flat_g, flat_z)


def _flat_rows(t: Tensor, channels_last: bool) -> Tensor:
    """(B, C, H, W) as (B, C*H*W), flattened in (H, W, C) order for ``channels_last``."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(t.shape[0], -1)


# --------------------------------------------------------------------------- compiled kernels
# The element-wise steps cost about a third of the eager time on CPU: some 25 passes over the
# chunk, each reading and writing whole maps. Compiled by inductor (C++ on CPU), the SSIM terms
# and the gradient assembly are one fused loop each (about 15% off a RetinaNet step). Opt-in
# (``set_compile`` or STRUCTKD_SSIM_COMPILE=1): the first call compiles for some seconds (nothing
# happens at import); any failure switches back to ``_Eager`` for the process, with a warning.

COMPILE_ENV = "STRUCTKD_SSIM_COMPILE"
# Chunks smaller than this stay eager: cheap anyway, and fewer shapes to compile for.
COMPILE_MIN_ELEMENTS = 1 << 16
_compile_setting: bool | None = None  # None: read COMPILE_ENV


def set_compile(enabled: bool | None) -> None:
    """Use (True) or not (False) the compiled element-wise kernels for float32 CPU inputs;
    None: as the environment variable STRUCTKD_SSIM_COMPILE says (off unless "1")."""
    global _compile_setting
    _compile_setting = enabled


def compile_enabled() -> bool:
    """Whether ``fused_ssim`` would use the compiled kernels (where they apply)."""
    if _compile_setting is not None:
        return _compile_setting and not _Compiled.failed
    return os.environ.get(COMPILE_ENV, "0") == "1" and not _Compiled.failed


def _kernels(x: Tensor, chunk_elements: int) -> type[_Eager] | _Compiled:
    if (
        x.device.type == "cpu" and x.dtype == torch.float32
        and chunk_elements >= COMPILE_MIN_ELEMENTS and compile_enabled()
        and not torch.compiler.is_compiling()
    ):
        return _COMPILED
    return _Eager


def _terms_fn(bl: Tensor, u: Tensor | None, c1: float, c2: float, lum: bool, need_gx: bool,
              need_gy: bool) -> Tensor:
    mu_x, mu_y, e_sq, e_xy = bl.unbind(0)
    mu_xy = mu_x * mu_y
    mu_sq = mu_x * mu_x + mu_y * mu_y
    a2 = (e_xy - mu_xy) * 2 + c2
    b2 = (e_sq - mu_sq) + c2
    inv_b2 = 1 / b2
    if lum:
        a1 = mu_xy * 2 + c1
        inv_b1 = 1 / (mu_sq + c1)
        inv_den = inv_b1 * inv_b2
        s = a1 * a2 * inv_den
    else:
        s = a2 * inv_b2
    total = s.sum(dtype=torch.float64)
    if u is not None:
        m_sq = s * inv_b2
        if lum:
            m_xy, h_a, h_b = a1 * inv_den, (a2 - a1) * inv_den, m_sq - s * inv_b1
        else:
            m_xy, h_a, h_b = inv_b2, -inv_b2, m_sq
        rows = ([h_a * mu_y + h_b * mu_x] if need_gx else []) + (
            [h_a * mu_x + h_b * mu_y] if need_gy else [])
        u.copy_(torch.stack([*rows, m_sq, m_xy]))
    return total


def _grad_fn(adj: Tensor, g_sq: Tensor, g_xy: Tensor, z: Tensor, z_other: Tensor, out: Tensor,
             factor: Tensor | float, per_channel: bool | None) -> tuple[Tensor, Tensor] | None:
    gz = adj - z * g_sq + z_other * g_xy
    out.copy_(gz * factor)
    if per_channel is None:
        return None
    dims = (2, 3) if per_channel else (1, 2, 3)
    return (gz.sum(dims, dtype=torch.float64).to(gz.dtype),
            (gz * z).sum(dims, dtype=torch.float64).to(gz.dtype))


class _Compiled:
    """``_Eager``'s steps through ``torch.compile`` (dynamic shapes: one compilation serves
    every level and chunk), compiled on first use; falls back to ``_Eager`` on any error."""

    failed = False

    def __init__(self) -> None:
        self._fns: dict[str, Callable] = {}

    def _call(self, name: str, raw: Callable, eager: Callable, *args: object) -> object:
        if not _Compiled.failed:
            try:
                if name not in self._fns:
                    self._fns[name] = torch.compile(raw, dynamic=True, fullgraph=True)
                return self._fns[name](*args)
            except Exception as err:
                _Compiled.failed = True
                warnings.warn(f"structkd SSIM: torch.compile failed ({type(err).__name__}: "
                              f"{err}); using the eager kernels", RuntimeWarning, stacklevel=4)
        return eager(*args)

    # Normalisation stays eager: compiled, its layout change measured ~2x slower.
    prep = staticmethod(_Eager.prep)

    def terms(self, blurred: Tensor, u: Tensor | None, b: int, c1: float, c2: float, lum: bool,
              need_gx: bool, need_gy: bool) -> Tensor:
        if _Compiled.failed:
            return _Eager.terms(blurred, u, b, c1, c2, lum, need_gx, need_gy)
        bl = blurred.permute(0, 2, 3, 1).reshape(4, -1)  # dense blocks: views
        uf = None if u is None else u.permute(0, 2, 3, 1).view(u.shape[0] // b, -1)
        return self._call(
            "terms", _terms_fn,
            lambda *_: _Eager.terms(blurred, u, b, c1, c2, lum, need_gx, need_gy),
            bl, uf, c1, c2, lum, need_gx, need_gy)

    def grad(self, adj: Tensor, g_sq: Tensor, g_xy: Tensor, z: Tensor, z_other: Tensor,
             out: Tensor, factor: Tensor | float,
             per_channel: bool | None) -> tuple[Tensor, Tensor] | None:
        return self._call("grad", _grad_fn, _Eager.grad, adj, g_sq, g_xy, z, z_other, out,
                          factor, per_channel)


_COMPILED = _Compiled()
