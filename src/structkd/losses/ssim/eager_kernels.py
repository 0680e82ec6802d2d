"""The steps of one chunk of the fused SSIM in eager PyTorch: the reference kernels.

``fused_ssim`` hands each chunk of channels to a kernel object: ``EagerKernels`` here, or the
opt-in ``CompiledKernels`` (``compiled_kernels``), which must give the same values to float32
rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blur import GaussianBlur, is_channels_last


class EagerKernels:
    """The steps of one chunk in eager PyTorch, in place where possible: the reference for
    ``CompiledKernels`` and its fallback. The blur runs on ``GaussianBlur`` (convolutions or
    matrix products into the caller's scratch buffers); the element-wise work in ``terms`` and
    ``grad``."""

    @staticmethod
    def chunk_channels(step: int, blur: GaussianBlur) -> int:
        """The channels per chunk, given the cache-sized ``step``: here ``step`` itself."""
        return step

    @classmethod
    def blur_terms(cls, blur: GaussianBlur, q: Tensor, buffers: tuple[Tensor, Tensor],
                   u: Tensor | None, b: int, c1: float, c2: float, lum: bool, need_gx: bool,
                   need_gy: bool) -> tuple[Tensor, Tensor | None]:
        """Blur the four maps of ``q``; return the chunk's sum of SSIM (``terms``) and what
        ``adjoint`` takes (here ``u``, filled). ``q`` is left intact (the blur writes into
        ``buffers``)."""
        return cls.terms(blur(q, buffers), u, b, c1, c2, lum, need_gx, need_gy), u

    @staticmethod
    def adjoint(blur: GaussianBlur, u: Tensor, buffers: tuple[Tensor, Tensor]) -> Tensor:
        """What ``grad`` needs of the half-derivatives ``u``: here their whole adjoint blur."""
        return blur.apply_adjoint(u, buffers)

    @classmethod
    def grad_of(cls, blur: GaussianBlur, adj: Tensor, i: int, b: int, z: Tensor,
                z_other: Tensor, out: Tensor, factor: Tensor | float,
                per_channel: bool | None) -> tuple[Tensor, Tensor] | None:
        """``grad`` for the map whose half-derivative is row block ``i`` of ``adj``."""
        return cls.grad(*adjoint_rows(adj, i, b), z, z_other, out, factor, per_channel)

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


def adjoint_rows(adj: Tensor, i: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
    """The blocks of a whole adjoint ``adj`` that ``grad`` takes for row block ``i``: its own,
    the E_sq block and the E_xy block (the last two)."""
    return adj[i * b : (i + 1) * b], adj[-2 * b : -b], adj[-b:]


def _flat_rows(t: Tensor, channels_last: bool) -> Tensor:
    """(B, C, H, W) as (B, C*H*W), flattened in (H, W, C) order for ``channels_last``."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(t.shape[0], -1)
