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
        cl = is_channels_last(gz)  # both flattened in gz's memory order (views when z shares it)
        flat_g, flat_z = (_flat_rows(t, cl) for t in (gz, z))
        sum_g += flat_g.sum(dim=1)
        sum_gz += torch.linalg.vecdot(flat_g, flat_z)


def _flat_rows(t: Tensor, channels_last: bool) -> Tensor:
    """(B, C, H, W) as (B, C*H*W), flattened in (H, W, C) order for ``channels_last``."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(t.shape[0], -1)
