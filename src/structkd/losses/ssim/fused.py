"""The fused SSIM distance kernel: value and analytic gradient in one chunked pass.

``fused_ssim`` computes mean((1 - SSIM) / 2) of min-max-rescaled maps for the exponents (1, 1, 1)
and (0, 1, 1). Channels are processed in cache-sized chunks, min-max normalisation happens on the
fly, and the gradient is formed in the same pass, so no full-size intermediate is kept besides
the gradient itself. ``FusedSSIMDistance`` puts it under autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..normalize import MinMaxStats
from .blur import is_channels_last
from .options import SSIMOptions

# Elements of one quantity per chunk: on CPU, small enough to keep the ~16 live chunk tensors
# inside the caches; on GPUs, large enough that one chunk fills the device (few kernel launches).
CHUNK_ELEMENTS = 1 << 19
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def _chunk_size(x: Tensor) -> int:
    b, c, h, w = x.shape
    budget = CHUNK_ELEMENTS if x.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, min(c, budget // (b * h * w)))


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
    # Chunk buffers are carved from two workspaces allocated once: fresh multi-MiB blocks in
    # every chunk can be returned to the OS and page-faulted back in, which costs as much as the
    # arithmetic on CPU.
    n_maps = 2 + need_gx + need_gy
    ws_q = x.new_empty(4 * b * min(c, step) * h * w)
    ws_u = x.new_empty(n_maps * b * min(c, step) * oh * ow) if need_grad else None
    for c0 in range(0, c, step):
        sl = slice(c0, min(c, c0 + step))
        k = sl.stop - sl.start
        q = _cl_view(ws_q, (4 * b, k, h, w))
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
        u = _cl_view(ws_u, (n_maps * b, k, oh, ow))
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


def _normalise_into(out: Tensor, t: Tensor, stats: MinMaxStats | None, sl: slice) -> None:
    """Write the min-max-rescaled channel slice ``t`` into ``out`` (any layout)."""
    if stats is None:
        out.copy_(t)
    elif stats.per_channel:
        torch.addcmul(stats.shift[:, sl], t, stats.inv_range[:, sl], out=out)
    else:
        torch.addcmul(stats.shift, t, stats.inv_range, out=out)


def _store(grad: Tensor, gz: Tensor, z: Tensor, stats, sums, sl: slice, scale: float) -> None:
    """Write ``scale`` * dS/dz of a chunk into ``grad``, times min-max's 1 / range where there is
    one (one pass, which also converts the layout; ``MinMaxStats.backward(scaled=True)`` then
    skips its own full-size product), and accumulate the row sums min-max's backward needs."""
    if stats is None:
        torch.mul(gz, scale, out=grad[:, sl])
        return
    inv_range = stats.inv_range[:, sl] if stats.per_channel else stats.inv_range
    torch.mul(gz, inv_range * scale, out=grad[:, sl])
    sum_g, sum_gz = sums
    if stats.per_channel:
        sum_g[:, sl] += gz.sum(dim=(2, 3))
        sum_gz[:, sl] += (gz * z).sum(dim=(2, 3))
    else:  # a dot product per sample over flat views: no (gz * z) temporary
        cl = is_channels_last(gz)  # both flattened in gz's memory order (views when z shares it)
        flat_g, flat_z = (_flat_rows(t, cl) for t in (gz, z))
        sum_g += flat_g.sum(dim=1)
        sum_gz += torch.linalg.vecdot(flat_g, flat_z)


def _flat_rows(t: Tensor, channels_last: bool) -> Tensor:
    """(B, C, H, W) as (B, C*H*W), flattened in (H, W, C) order for ``channels_last``."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(t.shape[0], -1)
