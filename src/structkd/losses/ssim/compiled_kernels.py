"""The opt-in compiled kernels of the fused SSIM: ``torch.compile`` (inductor, C++ on CPU).

Eager, a chunk of the SSIM costs some 25 passes over its maps: the blur's convolutions and
border products, then the element-wise terms and the gradient assembly, each reading and writing
whole maps. Compiled, a chunk takes four functions on levels whose both axes are blurred by
convolution with "same" padding (RetinaNet's P3 and P4 hold ~95% of the pixels): the blur along
W; the blur along H with the SSIM terms and their derivatives; the adjoint blur along H; the
adjoint blur along W with the gradient and min-max's row sums. The reflect padding is a gather
inside the blur's loop, and the adjoint is the same blur plus two small end blocks
(``adjoint_ends``), so no padded copy is made. Other levels and "valid" padding compile only
the element-wise steps and keep ``GaussianBlur``.

Opt-in (``set_compile`` or STRUCTKD_SSIM_COMPILE=1), float32 CPU: the first call compiles
(~15-20 s for the benchmark's levels with a cold compiler cache; nothing happens at import); any
compiler failure switches back to ``EagerKernels`` for the process, with a warning. Shapes are
dynamic except the channel count of a chunk, which the vector loops need fixed: a new level
size costs no new compilation, a new chunk width (a power of two: ``chunk_channels``) or set of
options does.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .blur import GaussianBlur, blur_matrix
from .eager_kernels import EagerKernels, adjoint_rows

COMPILE_ENV = "STRUCTKD_SSIM_COMPILE"
# Chunks smaller than this stay eager: cheap anyway, and fewer shapes to compile for.
COMPILE_MIN_ELEMENTS = 1 << 16
_compile_setting: bool | None = None  # None: read COMPILE_ENV
# Compilations kept per function: one per chunk width (static) and per combination of options
# (luminance, which gradients, min-max mode); the compiler's default of 8 is too few for a
# process that meets several of them, and passing it is an error (``fullgraph``).
RECOMPILE_LIMIT = 64


def set_compile(enabled: bool | None) -> None:
    """Use (True) or not (False) the compiled kernels for float32 CPU inputs; None: as the
    environment variable STRUCTKD_SSIM_COMPILE says (off unless "1")."""
    global _compile_setting
    _compile_setting = enabled


def compile_enabled() -> bool:
    """Whether ``fused_ssim`` would use the compiled kernels (where they apply)."""
    if _compile_setting is not None:
        return _compile_setting and not CompiledKernels.failed
    return os.environ.get(COMPILE_ENV, "0") == "1" and not CompiledKernels.failed


def kernels_for(x: Tensor, chunk_elements: int) -> type[EagerKernels] | CompiledKernels:
    """The kernels for chunks of ``chunk_elements`` of ``x``: compiled where enabled and useful."""
    if (
        x.device.type == "cpu" and x.dtype == torch.float32
        and chunk_elements >= COMPILE_MIN_ELEMENTS and compile_enabled()
        and not torch.compiler.is_compiling()
    ):
        return COMPILED
    return EagerKernels


# ------------------------------------------------------------------ functions that get compiled
# The fused-blur functions take (N, H, W, C) views of channels-last maps: C innermost, the
# axis the loops vectorise over.


def _ssim_terms(mu_x: Tensor, mu_y: Tensor, e_sq: Tensor, e_xy: Tensor, c1: float, c2: float,
                lum: bool, need_u: bool, need_gx: bool,
                need_gy: bool) -> tuple[Tensor, list[Tensor]]:
    """SSIM from the blurred maps and, with ``need_u``, the rows of ``EagerKernels.terms``'
    ``u``: [mu_x term], [mu_y term], E_sq term, E_xy term."""
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
    if not need_u:
        return s, []
    m_sq = s * inv_b2
    if lum:
        m_xy, h_a, h_b = a1 * inv_den, (a2 - a1) * inv_den, m_sq - s * inv_b1
    else:
        m_xy, h_a, h_b = inv_b2, -inv_b2, m_sq
    rows = ([h_a * mu_y + h_b * mu_x] if need_gx else []) + (
        [h_a * mu_x + h_b * mu_y] if need_gy else [])
    return s, [*rows, m_sq, m_xy]


def _terms_fn(bl: Tensor, u: Tensor | None, c1: float, c2: float, lum: bool, need_gx: bool,
              need_gy: bool) -> Tensor:
    """``EagerKernels.terms`` on (4, N) rows of blurred maps, ``u`` as (rows, N)."""
    s, rows = _ssim_terms(*bl.unbind(0), c1, c2, lum, u is not None, need_gx, need_gy)
    if u is not None:
        u.copy_(torch.stack(rows))
    return s.sum(dtype=torch.float64)


def _grad_fn(adj: Tensor, g_sq: Tensor, g_xy: Tensor, z: Tensor, z_other: Tensor, out: Tensor,
             factor: Tensor | float, per_channel: bool | None) -> tuple[Tensor, Tensor] | None:
    """``EagerKernels.grad``; row sums accumulated in float64."""
    gz = adj - z * g_sq + z_other * g_xy
    out.copy_(gz * factor)
    if per_channel is None:
        return None
    return _row_sums(gz, z, (2, 3) if per_channel else (1, 2, 3))


def _row_sums(gz: Tensor, z: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The sums of dS/dz and dS/dz * z over ``dims`` that min-max's backward needs,
    accumulated in float64."""
    return (gz.sum(dims, dtype=torch.float64).to(gz.dtype),
            (gz * z).sum(dims, dtype=torch.float64).to(gz.dtype))


def _blur_axis(x: Tensor, axis: int, g: Tensor) -> Tensor:
    """The reflect-padded 1-D blur of (N, H, W, C) ``x`` along ``axis`` (1: H, 2: W).

    The padding is a gather by a computed index: the compiler turns it into loads inside the
    blur's loop, where a concatenation would be written out as a padded copy first."""
    taps, n = g.shape[0], x.shape[axis]
    p = taps // 2
    j = torch.arange(-p, n + p, device=x.device).abs()
    xp = x.index_select(axis, torch.where(j >= n, 2 * (n - 1) - j, j))
    out = g[0] * xp.narrow(axis, 0, n)
    for t in range(1, taps):
        out = out + g[t] * xp.narrow(axis, t, n)
    return out


def _blur_axis_adjoint(u: Tensor, axis: int, g: Tensor, ends: Tensor) -> Tensor:
    """The transpose of ``_blur_axis``: the same blur (the window is symmetric) plus the two
    end blocks ``ends`` = (low, high) of B^T - B, each (m, m) (``adjoint_ends``)."""
    n, m = u.shape[axis], ends.shape[1]
    out = _blur_axis(u, axis, g)
    shape = [1] * u.dim()
    shape[axis] = m
    for start, block in ((0, ends[0]), (n - m, ends[1])):
        strip = u.narrow(axis, start, m)
        fix = torch.stack([(block[i].view(shape) * strip).sum(axis) for i in range(m)], axis)
        pad = [0] * (2 * (u.dim() - axis))  # F.pad lists the last axis first
        pad[-2], pad[-1] = start, n - m - start
        out = out + F.pad(fix, pad)
    return out


# Each returns its maps as new tensors, one per quantity: written into slices of a caller's
# buffer, they cost a second loop that gathers them (measured 1.9 vs 1.1 ms for a P3 chunk).


def _w_fn(q: Tensor, gw: Tensor) -> tuple[Tensor, ...]:
    """The four maps of ``q`` (4B, H, W, C), each blurred along W."""
    b = q.shape[0] // 4
    return tuple(_blur_axis(q[i * b : (i + 1) * b], 2, gw) for i in range(4))


def _h_terms_fn(bx: Tensor, by: Tensor, bsq: Tensor, bxy: Tensor, gh: Tensor, c1: float,
                c2: float, lum: bool, need_u: bool, need_gx: bool,
                need_gy: bool) -> tuple[Tensor, ...]:
    """The blur along H and the SSIM terms: (sum of SSIM, *rows of u)."""
    blurred = [_blur_axis(t, 1, gh) for t in (bx, by, bsq, bxy)]
    s, rows = _ssim_terms(*blurred, c1, c2, lum, need_u, need_gx, need_gy)
    return s.sum(dtype=torch.float64), *rows


def _h_adjoint_fn(rows: tuple[Tensor, ...], gh: Tensor, ends: Tensor) -> tuple[Tensor, ...]:
    return tuple(_blur_axis_adjoint(r, 1, gh, ends) for r in rows)


def _w_grad_fn(a: Tensor, a_sq: Tensor, a_xy: Tensor, z: Tensor, z_other: Tensor,
               factor: Tensor | float, gw: Tensor, ends: Tensor,
               per_channel: bool | None) -> tuple[Tensor, ...]:
    """``_grad_fn`` after the adjoint blur along W, on (N, H, W, C) maps: (``factor`` *
    dS/dz, [its row sums of dS/dz and dS/dz * z])."""
    gz = (_blur_axis_adjoint(a, 2, gw, ends) - z * _blur_axis_adjoint(a_sq, 2, gw, ends)
          + z_other * _blur_axis_adjoint(a_xy, 2, gw, ends))
    if per_channel is None:
        return (gz * factor,)
    return gz * factor, *_row_sums(gz, z, (1, 2) if per_channel else (1, 2, 3))


@functools.lru_cache(maxsize=64)
def adjoint_ends(taps: int, sigma: float, dtype: torch.dtype, device: str) -> Tensor:
    """(2, m, m), m = taps // 2 + 1: the low and high end blocks of B^T - B, where B is the
    reflect-padded blur along an axis (``blur_matrix``); B^T - B is zero elsewhere on any axis
    of at least ``fusable_length(taps)`` pixels (checked here on the shortest)."""
    m = taps // 2 + 1
    n = fusable_length(taps)
    b = blur_matrix(n, taps, sigma, "same", torch.float64, "cpu")
    d = b.T - b
    ends = torch.stack([d[:m, :m], d[n - m :, n - m :]])
    d[:m, :m] = 0
    d[n - m :, n - m :] = 0
    if float(d.abs().max()) > 1e-12:  # pragma: no cover - a property of blur_matrix
        raise AssertionError("B^T - B is not confined to its end blocks")
    return ends.to(dtype=dtype, device=device)


def fusable_length(taps: int) -> int:
    """The shortest axis the fused blur takes: the two end blocks stay apart."""
    return 4 * (taps // 2) + 4


# ------------------------------------------------------------------------------- the kernels


class CompiledKernels:
    """``EagerKernels``' interface through ``torch.compile``, compiled on first use; falls back
    to ``EagerKernels`` (or, mid-chunk, to the uncompiled functions) on any error."""

    failed = False

    def __init__(self) -> None:
        self._fns: dict[str, Callable] = {}

    def _call(self, name: str, raw: Callable, eager: Callable, *args: object) -> object:
        if not CompiledKernels.failed:
            try:
                if name not in self._fns:
                    self._fns[name] = torch.compile(raw, dynamic=True, fullgraph=True)
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                                automatic_dynamic_shapes=False):
                    return self._fns[name](*args)
            except Exception as err:
                CompiledKernels.failed = True
                warnings.warn(f"structkd SSIM: torch.compile failed ({type(err).__name__}: "
                              f"{err}); using the eager kernels", RuntimeWarning, stacklevel=4)
        return eager(*args)

    @staticmethod
    def fuses(blur: GaussianBlur) -> bool:
        """Whether a chunk's blur runs inside the compiled loops: "same" padding with both axes
        blurred by convolution (not by a small matrix) and long enough (``fusable_length``)."""
        return (
            blur.padding == "same" and blur.rh is None and blur.rw is None
            and blur.kh > 1 and blur.kw > 1
            and min(blur.height, blur.width) >= fusable_length(max(blur.kh, blur.kw))
        )

    def chunk_channels(self, step: int, blur: GaussianBlur) -> int:
        """The channels per chunk: on the fused path ``step`` rounded to a power of two (16,
        32, 64, ...; nearest on a log scale), because every chunk width is compiled anew
        (~10-50 s): levels of varying size then meet a few widths, not one per size."""
        if not self.fuses(blur) or step < 16:
            return step
        return 1 << round(math.log2(step))

    # Normalisation stays eager: compiled, its layout change (the caller's (B, C, H, W) to
    # channels-last) measured ~2x slower, and ~11x fused into the blur along W.
    prep = staticmethod(EagerKernels.prep)

    def blur_terms(self, blur: GaussianBlur, q: Tensor, buffers: tuple[Tensor, Tensor],
                   u: Tensor | None, b: int, c1: float, c2: float, lum: bool, need_gx: bool,
                   need_gy: bool) -> tuple[Tensor, Tensor | tuple[Tensor, ...] | None]:
        if not self.fuses(blur):
            blurred = blur(q, buffers)
            bl = blurred.permute(0, 2, 3, 1).reshape(4, -1)  # dense blocks: views
            uf = None if u is None else u.permute(0, 2, 3, 1).view(u.shape[0] // b, -1)
            total = self._call(
                "terms", _terms_fn,
                lambda *_: EagerKernels.terms(blurred, u, b, c1, c2, lum, need_gx, need_gy),
                bl, uf, c1, c2, lum, need_gx, need_gy)
            return total, u
        # Fused: after a compiler failure the same functions run uncompiled (correct, slow)
        # for the rest of this call; later calls get ``EagerKernels`` (``kernels_for``).
        bw = self._call("blur_w", _w_fn, _w_fn, _nhwc(q), blur.gw)
        total, *rows = self._call("blur_h_terms", _h_terms_fn, _h_terms_fn,
                                  *(_static_c(t) for t in bw), blur.gh, c1, c2, lum,
                                  u is not None, need_gx, need_gy)
        return total, (tuple(rows) if u is not None else None)

    def adjoint(self, blur: GaussianBlur, u: Tensor | tuple[Tensor, ...],
                buffers: tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, ...]:
        """The adjoint blur of ``u``; where the blur is fused, its H half only, row by row as
        (N, H, W, C) maps (the W half runs inside ``grad_of``)."""
        if not isinstance(u, tuple):
            return blur.apply_adjoint(u, buffers)
        return self._call("adjoint_h", _h_adjoint_fn, _h_adjoint_fn,
                          tuple(_static_c(r) for r in u), blur.gh, _ends(blur, blur.kh))

    def grad_of(self, blur: GaussianBlur, adj: Tensor | tuple[Tensor, ...], i: int, b: int,
                z: Tensor, z_other: Tensor, out: Tensor, factor: Tensor | float,
                per_channel: bool | None) -> tuple[Tensor, Tensor] | None:
        if not isinstance(adj, tuple):
            return self._call("grad", _grad_fn, EagerKernels.grad, *adjoint_rows(adj, i, b), z,
                              z_other, out, factor, per_channel)
        if isinstance(factor, Tensor):
            factor = factor.permute(0, 2, 3, 1)
        g, *sums = self._call(
            "adjoint_w_grad", _w_grad_fn, _w_grad_fn, *(_static_c(r) for r in (
                adj[i], adj[-2], adj[-1])), _nhwc(z), _nhwc(z_other), factor, blur.gw,
            _ends(blur, blur.kw), per_channel)
        out.copy_(g.permute(0, 3, 1, 2))  # into the caller's layout
        return (sums[0], sums[1]) if sums else None


def _ends(blur: GaussianBlur, taps: int) -> Tensor:
    return adjoint_ends(taps, blur.sigma, blur.gw.dtype, str(blur.gw.device))


def _nhwc(t: Tensor) -> Tensor:
    """The (N, H, W, C) view of an (N, C, H, W) tensor, its channel count marked static for
    the compiler (the vector loops run along it)."""
    return _static_c(t.permute(0, 2, 3, 1))


def _static_c(v: Tensor) -> Tensor:
    """``v`` (N, H, W, C) with its channel count marked static (``_nhwc``)."""
    torch._dynamo.mark_static(v, 3)
    return v


COMPILED = CompiledKernels()
