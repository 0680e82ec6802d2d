"""The fused SSIM distance kernel: value and analytic gradient in one chunked pass.

``fused_ssim`` computes mean((1 - SSIM) / 2) of min-max-rescaled maps for the exponents (1, 1, 1)
and (0, 1, 1). Channels are processed in cache-sized chunks, min-max normalisation happens on the
fly, and the gradient is formed in the same pass, so no full-size intermediate is kept besides
the gradient itself. ``FusedSSIMDistance`` puts it under autograd.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from ..normalize import MinMaxStats
from .compiled_kernels import kernels_for
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
    kernels = kernels_for(x, b * min(c, step) * oh * ow)
    step = kernels.chunk_channels(step, blur)
    # Chunk buffers (the maps, the blur's two scratch buffers, the gradient maps) are carved from
    # one workspace, kept between calls on CPU (``_workspace``): fresh multi-MiB blocks are
    # returned to the OS when freed and page-faulted back in, which costs as much as the
    # arithmetic on CPU. (The compiled kernels' fused blur returns new maps instead: written
    # into slices of these buffers they cost an extra loop; see ``compiled_kernels``.)
    n_maps = 2 + need_gx + need_gy
    m_in, m_out = b * min(c, step) * h * w, b * min(c, step) * oh * ow
    ws = _workspace(x, 12 * m_in + (n_maps * m_out if need_grad else 0))
    ws_q, ws_a, ws_b, ws_u = ws.split([4 * m_in, 4 * m_in, 4 * m_in, ws.numel() - 12 * m_in])
    ws_blur = (ws_a, ws_b)
    for c0 in range(0, c, step):
        sl = slice(c0, min(c, c0 + step))
        k = sl.stop - sl.start
        q = _cl_view(ws_q, (4 * b, k, h, w))
        zx, zy = q[:b], q[b : 2 * b]
        kernels.prep(x[:, sl], y[:, sl], _affine(stats_x, sl), _affine(stats_y, sl), q)
        u = _cl_view(ws_u, (n_maps * b, k, oh, ow)) if need_grad else None
        # the blur writes into ws_blur, never into q: z_x, z_y are read again below
        total, u_maps = kernels.blur_terms(blur, q, ws_blur, u, b, c1, c2, lum, need_gx,
                                           need_gy)
        partial.append(total)
        if u_maps is None:
            continue
        adj = kernels.adjoint(blur, u_maps, ws_blur)
        for grad, z, z_other, stats, name, i in (
            (grad_x, zx, zy, stats_x, "x", 0), (grad_y, zy, zx, stats_y, "y", need_gx)
        ):
            if grad is None:
                continue
            factor = scale if stats is None else (
                stats.inv_range[:, sl] if stats.per_channel else stats.inv_range) * scale
            row_sums = kernels.grad_of(blur, adj, i, b, z, z_other, grad[:, sl], factor,
                                       None if stats is None else stats.per_channel)
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
