"""Min-max rescaling of feature maps to [0, 1] (the paper's psi), with an exact, cheap gradient.

Autograd through ``amin``/``amax`` compares every element with the extreme value in the backward
pass; the closed form below needs only two reductions and two scattered updates:
with ``z = (x - m) / r`` and ``r = M - m + eps``,
``dL/dx_j = (g_j - [j = argmin] sum_i g_i (1 - z_i) - [j = argmax] sum_i g_i z_i) / r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_choice

NORMALIZE_MODES = ("minmax", "minmax_channel", None)
DEFAULT_EPS = 1e-6


@dataclass
class MinMaxStats:
    """Per-row extremes of a (B, C, H, W) tensor; a row is a sample or a (sample, channel) pair."""

    low: Tensor  # broadcastable to the input: (B, 1, 1, 1) or (B, C, 1, 1)
    high: Tensor  # same shape as ``low``
    inv_range: Tensor  # 1 / (max - min + eps), same shape as ``low``
    argmin: Tensor | None  # (rows,) flat index of the minimum within its row
    argmax: Tensor | None  # (rows,); both None when built with ``index=False``
    per_channel: bool

    @classmethod
    def of(cls, x: Tensor, mode: str, eps: float = DEFAULT_EPS, *,
           index: bool = True) -> MinMaxStats:
        """Compute the statistics of ``x`` for ``mode`` ("minmax" or "minmax_channel").

        ``index=False`` skips the arg-extremes (one pass instead of two) for inputs that need
        no gradient, e.g. the teacher's features.
        """
        per_channel = mode == "minmax_channel"
        b, c, h, w = x.shape
        # Rows split into blocks (a channel per sample, a line per channel) for ``_extreme``.
        blocks = x.reshape(b * c, h, w) if per_channel else x.reshape(b, c, h * w)
        imin = imax = None
        if index:
            vmin, imin = _extreme(blocks, largest=False)
            vmax, imax = _extreme(blocks, largest=True)
        else:  # amin/amax are about 8x faster than min/max with indices (aminmax is slower)
            rows = blocks.reshape(blocks.shape[0], -1)
            vmin, vmax = rows.amin(dim=1), rows.amax(dim=1)
        shape = (b, c, 1, 1) if per_channel else (b, 1, 1, 1)
        inv_range = (vmax - vmin + eps).reciprocal()
        return cls(vmin.view(shape), vmax.view(shape), inv_range.view(shape), imin, imax,
                   per_channel)

    @property
    def shift(self) -> Tensor:
        """``-low * inv_range``, so that ``apply(x) == shift + x * inv_range``."""
        return -self.low * self.inv_range

    def apply(self, x: Tensor) -> Tensor:
        """Rescale ``x`` (or a channel slice of it, with stats sliced by ``channels``)."""
        return (x - self.low) * self.inv_range

    def backward(self, grad_z: Tensor, sum_g: Tensor, sum_gz: Tensor, *,
                 scaled: bool = False) -> Tensor:
        """Turn dL/dz into dL/dx in place, given per-row sums of g and of g*z.

        ``scaled=True``: ``grad_z`` already holds dL/dz times ``inv_range`` (a caller that writes
        the gradient in a pass of its own folds the product in and saves a full-size pass).
        """
        if self.argmin is None or self.argmax is None:
            raise RuntimeError("MinMaxStats built with index=False cannot back-propagate")
        if not scaled:
            grad_z.mul_(self.inv_range)
        rows = grad_z.view(self.argmin.numel(), -1)
        inv = self.inv_range.reshape(-1)
        rows.scatter_add_(1, self.argmin[:, None], (-(sum_g - sum_gz) * inv)[:, None])
        rows.scatter_add_(1, self.argmax[:, None], (-sum_gz * inv)[:, None])
        return grad_z

    def row_sums(self, t: Tensor) -> Tensor:
        """Sum ``t`` (B, C', H, W) over each row: (B,) per sample or (B, C') per channel."""
        return t.sum(dim=(2, 3)) if self.per_channel else t.sum(dim=(1, 2, 3))


def _extreme(blocks: Tensor, *, largest: bool) -> tuple[Tensor, Tensor]:
    """Per-row minimum (or maximum) of (rows, n1, n2) ``blocks`` and its flat index in the row.

    Equals ``rows.min(dim=1)`` / ``max``, index of the first occurrence included (NaN counts as
    the extreme), but about 8x faster on CPU: the extreme of every block with amin/amax (fast,
    vectorised), then the index within the first block holding the row's extreme.
    """
    per_block = blocks.amax(dim=2) if largest else blocks.amin(dim=2)  # (rows, n1)
    arg = per_block.argmax if largest else per_block.argmin
    j = arg(dim=1)  # first block holding the row's extreme
    rows = torch.arange(blocks.shape[0], device=blocks.device)
    block = blocks[rows, j]  # (rows, n2)
    k = block.argmax(dim=1) if largest else block.argmin(dim=1)
    return per_block[rows, j], j * blocks.shape[2] + k


class _MinMaxNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mode: str, eps: float) -> Tensor:  # type: ignore[override]
        stats = MinMaxStats.of(x, mode, eps)
        z = stats.apply(x)
        ctx.stats = stats
        ctx.save_for_backward(z)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        stats: MinMaxStats = ctx.stats
        grad = grad.contiguous()
        sums_g = stats.row_sums(grad).reshape(-1)
        sums_gz = stats.row_sums(grad * z).reshape(-1)
        return stats.backward(grad.clone(), sums_g, sums_gz), None, None


def minmax_normalize(x: Tensor, mode: str | None = "minmax", eps: float = DEFAULT_EPS) -> Tensor:
    """Rescale a (B, C, H, W) tensor to [0, 1] per sample ("minmax") or per channel.

    ``mode=None`` returns ``x`` unchanged. A constant map becomes all zeros (no NaN).
    """
    check_choice("normalize", mode, NORMALIZE_MODES)
    if mode is None:
        return x
    if x.dim() != 4:
        raise ValueError(f"minmax_normalize expects (B, C, H, W), got shape {tuple(x.shape)}")
    return _MinMaxNormalize.apply(x.contiguous(), mode, eps)
