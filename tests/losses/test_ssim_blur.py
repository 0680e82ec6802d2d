"""The SSIM blur operator (``structkd.losses.ssim.blur``): the window truncation rule, the
Gaussian window, the blur and its adjoint (matrix and convolution paths, both layouts) against the
float64 numpy reference of ``tests/golden/make_golden.py`` and autograd, and the slice-copy reflect
padding against ``F.pad``."""

from __future__ import annotations

import math

import kornia
import numpy as np
import pytest
import torch
from loss_helpers import F64, PADDINGS, REF, rand, to_np
from torch.testing import assert_close

import structkd.losses.ssim.blur as blur_mod
from structkd.losses import gaussian_window
from structkd.losses.ssim import GaussianBlur, reflect_pad, reflect_pad_adjoint, window_taps


def test_window_taps_truncation_rule():
    """Documented rule: a window larger than the map is truncated per dimension to the largest
    odd size the padding allows, "same" (reflect, pad < dim) -> min(w, 2*dim - 1), "valid" ->
    min(w, dim rounded down to odd); the truncated Gaussian is renormalised."""
    same = {1: 1, 2: 3, 3: 5, 4: 7, 5: 9, 6: 11, 7: 11, 11: 11, 100: 11}
    valid = {1: 1, 2: 1, 3: 3, 4: 3, 5: 5, 7: 7, 10: 9, 11: 11, 12: 11, 100: 11}
    assert {d: window_taps(d, 11, "same") for d in same} == same
    assert {d: window_taps(d, 11, "valid") for d in valid} == valid
    assert window_taps(4, 3, "same") == 3
    assert window_taps(2, 5, "valid") == 1
    for d in (*same, *valid):
        for padding in PADDINGS:
            assert window_taps(d, 11, padding) == REF.taps(d, 11, padding)


def test_gaussian_window_values():
    g = gaussian_window(11, 1.5, dtype=F64)
    assert_close(g, torch.from_numpy(REF.gauss(11, 1.5)), rtol=0, atol=1e-15)
    kg = kornia.filters.get_gaussian_kernel1d(11, 1.5, dtype=F64)[0]
    assert_close(g, kg, rtol=0, atol=1e-15)
    assert float(g.sum()) == pytest.approx(1.0, abs=1e-15)
    centre = 1 / sum(math.exp(-(k**2) / 4.5) for k in range(-5, 6))
    assert float(g[5]) == pytest.approx(centre, abs=1e-15)
    assert float(g[0] / g[5]) == pytest.approx(math.exp(-25 / 4.5), rel=1e-14)
    assert gaussian_window(1, 1.5).tolist() == [1.0]
    assert gaussian_window(11, 1.5).dtype == torch.float32


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 5), (2, 2), (3, 4), (7, 11), (12, 13),
                                    (34, 36), (9, 40), (41, 6)])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_blur_and_its_adjoint(h, w, padding, layout):
    """The blur equals the numpy reference (truncated window), and its adjoint, which the fused
    gradient relies on, equals autograd's vector-Jacobian product of the blur; for axes blurred
    by a matrix (<= MATMUL_MAX), by a convolution (longer), and one of each."""
    assert blur_mod.MATMUL_MAX < 34
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    blur = GaussianBlur(h, w, window_size=11, sigma=1.5, padding=padding, dtype=F64,
                        device=torch.device("cpu"))
    assert (blur.kh, blur.kw) == (window_taps(h, 11, padding), window_taps(w, 11, padding))
    x = rand((2, 3, h, w), 60).contiguous(memory_format=fmt).requires_grad_()
    bx = blur(x)
    np.testing.assert_allclose(to_np(bx), REF.np_blur(to_np(x), 11, 1.5, padding), rtol=0,
                               atol=1e-14)
    u = rand(tuple(bx.shape), 61).contiguous(memory_format=fmt)
    (vjp,) = torch.autograd.grad(bx, x, u)
    u_before = u.clone()
    assert_close(blur.apply_adjoint(u), vjp, rtol=0, atol=1e-14)
    assert torch.equal(u, u_before)  # the caller's gradient map is left alone


_PADS = [(h, w, ph, pw) for h, w in [(1, 1), (2, 3), (6, 6), (11, 12)]
         for ph, pw in [(0, 0), (0, 1), (1, 0), (1, 1), (5, 5), (5, 2)] if ph < h and pw < w]


@pytest.mark.parametrize(("h", "w", "ph", "pw"), _PADS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reflect_pad_matches_torch(h, w, ph, pw, layout):
    """The slice-copy reflect padding equals F.pad (which needs pad < size, as the blur's
    truncated windows guarantee), and its adjoint equals autograd's."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = rand((2, 3, h, w), 62).contiguous(memory_format=fmt).requires_grad_()
    ref = torch.nn.functional.pad(x, (pw, pw, ph, ph), mode="reflect") if ph or pw else x
    got = reflect_pad(x, ph, pw)
    assert torch.equal(got, ref)
    assert got.is_contiguous(memory_format=fmt)
    u = rand(tuple(ref.shape), 63).contiguous(memory_format=fmt)
    (vjp,) = torch.autograd.grad(ref, x, u)
    assert_close(reflect_pad_adjoint(u.clone(), ph, pw), vjp, rtol=0, atol=1e-14)
    (vjp_own,) = torch.autograd.grad(got, x, u)  # reflect_pad is differentiable itself
    assert_close(vjp_own, vjp, rtol=0, atol=1e-14)


def test_gaussian_window_errors():
    with pytest.raises(ValueError, match=r"window_size=6"):
        gaussian_window(6, 1.5)
    with pytest.raises(ValueError, match=r"sigma=0"):
        gaussian_window(5, 0)


@pytest.mark.parametrize(("dim", "taps"), [(40, 11), (33, 11), (36, 31), (12, 23), (5, 9), (3, 3)])
def test_border_matrix_is_reflect_minus_zero_padding(dim, taps):
    """``border_matrix`` (and its flip at the high end) is exactly what reflect padding adds to a
    zero-padded blur: the dense reflect matrix minus the banded zero-padded one."""
    reflect = blur_mod.blur_matrix(dim, taps, 1.5, "same", F64, "cpu")
    g = gaussian_window(taps, 1.5, dtype=F64)
    p = taps // 2
    zero = torch.zeros(dim, dim, dtype=F64)
    for i in range(dim):
        for t in range(taps):
            if 0 <= i + t - p < dim:
                zero[i, i + t - p] += g[t]
    a = blur_mod.border_matrix(taps, 1.5, F64, "cpu")
    expected = torch.zeros(dim, dim, dtype=F64)
    expected[:p, 1 : p + 1] += a
    expected[dim - p :, dim - p - 1 : dim - 1] += a.flip(0, 1)
    assert_close(reflect - zero, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("axis", [-1, -2])
def test_reflected_border_and_its_adjoint(axis, layout):
    """Zero-padded convolution + ``add_reflected_border`` equals a convolution of the reflect-padded
    map, and the adjoint flag gives the transpose (<A y, u> = <y, A^T u>)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = rand((2, 3, 37, 41), 62).contiguous(memory_format=fmt)
    u = rand((2, 3, 37, 41), 63).contiguous(memory_format=fmt)
    a = blur_mod.border_matrix(11, 1.5, F64, "cpu")
    got, adj = torch.zeros_like(x), torch.zeros_like(u)
    blur_mod.add_reflected_border(got, x, a, axis, adjoint=False)
    blur_mod.add_reflected_border(adj, u, a, axis, adjoint=True)
    pads = (0, 0, 5, 5) if axis == -2 else (5, 5, 0, 0)
    full = torch.nn.functional.pad(x, pads, mode="reflect") - torch.nn.functional.pad(x, pads)
    n = x.shape[axis]
    # the padded-out pixels, folded onto the border pixels their taps reach
    g = gaussian_window(11, 1.5, dtype=F64)
    kernel = g.view(1, 1, -1, 1) if axis == -2 else g.view(1, 1, 1, -1)
    expected = torch.nn.functional.conv2d(full, kernel.expand(3, 1, *kernel.shape[2:]), groups=3)
    assert expected.shape[axis] == n
    assert_close(got, expected, rtol=0, atol=1e-14)
    assert_close((got * u).sum(), (x * adj).sum(), rtol=1e-13, atol=0)
