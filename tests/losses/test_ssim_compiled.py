"""The opt-in compiled kernels of the fused SSIM (``structkd.losses.ssim.compiled_kernels``,
``set_compile``): value and gradients equal the eager kernels' to float32 rounding (the compiled
loops may contract multiply-adds and sum in another order), the fused blur and its adjoint equal
the dense blur matrix and its transpose, and any compiler failure falls back to the eager
kernels. Skipped where ``torch.compile`` cannot build CPU kernels."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import structkd.losses.ssim.compiled_kernels as compiled_mod
import structkd.losses.ssim.fused as fused_mod
from structkd.losses import ssim_distance
from structkd.losses.ssim.blur import GaussianBlur, blur_matrix

# Large enough for the compiled path (a chunk of >= COMPILE_MIN_ELEMENTS) and longer than
# MATMUL_MAX along both axes: with "same" padding the blur runs inside the compiled loops.
SHAPE = (2, 16, 60, 64)
FUSED = {"blur_w", "blur_h_terms", "adjoint_h", "adjoint_w_grad"}


def _value_and_grads(x, y, opts, *, compiled, both):
    compiled_mod.set_compile(compiled)
    try:
        a = x.detach().clone().requires_grad_()
        b = y.detach().clone().requires_grad_(both)
        loss = ssim_distance(a, b, **opts)
        loss.backward()
        return loss.detach(), a.grad, b.grad
    finally:
        compiled_mod.set_compile(None)


@pytest.fixture
def compile_or_skip():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    yield
    compiled_mod.CompiledKernels.failed = False


@pytest.mark.parametrize(
    ("opts", "both", "ran"),
    [pytest.param({}, False, FUSED, id="default"),  # the benchmark's: min-max per sample,
     # "same", teacher without gradient. Each other set of options compiles anew (~25-45 s
     # with a cold compiler cache): those on the fused path are marked slow.
     pytest.param({"normalize": "minmax_channel", "components": (0, 1, 1)}, True, FUSED,
                  id="channel-cs-both", marks=pytest.mark.slow),
     pytest.param({"normalize": None, "data_range": 8.0}, True, FUSED, id="no-minmax-both",
                  marks=pytest.mark.slow),
     # "valid": GaussianBlur and the compiled element-wise steps
     pytest.param({"normalize": "minmax_channel", "padding": "valid", "components": (0, 1, 1)},
                  True, {"terms", "grad"}, id="channel-valid-cs-both")],
)
def test_compiled_equals_eager(opts, both, ran, compile_or_skip, monkeypatch):
    monkeypatch.setattr(compiled_mod, "COMPILED", compiled_mod.CompiledKernels())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=gen)
    y = 0.5 * x + torch.randn(SHAPE, generator=gen)
    assert fused_mod._chunk_size(x) * 2 * 50 * 54 >= compiled_mod.COMPILE_MIN_ELEMENTS  # "valid"
    v_e, gx_e, gy_e = _value_and_grads(x, y, opts, compiled=False, both=both)
    v_c, gx_c, gy_c = _value_and_grads(x, y, opts, compiled=True, both=both)
    if compiled_mod.CompiledKernels.failed:
        pytest.skip("torch.compile could not build the CPU kernels here")
    assert set(compiled_mod.COMPILED._fns) == ran  # the compiled path ran, and which
    # float32: value to 1e-6 relative; gradients to 1e-5 of their largest entry (measured:
    # equal values, gradients within 6e-7 with min-max and 5e-6 without; the compiled row
    # sums accumulate in float64)
    assert_close(v_c, v_e, rtol=1e-6, atol=0)
    for g_c, g_e in ((gx_c, gx_e), (gy_c, gy_e)):
        if g_e is None:
            assert g_c is None
            continue
        assert_close(g_c, g_e, rtol=0, atol=1e-5 * float(g_e.abs().max()))


@pytest.mark.parametrize("length", [compiled_mod.fusable_length(11), 45])
@pytest.mark.parametrize("axis", [1, 2])
def test_fused_blur_and_adjoint_are_the_blur_matrix(length, axis):
    """The functions the compiler fuses, run as plain PyTorch: the blur along an axis is the
    reflect-padded blur matrix, and the adjoint its transpose, on the shortest axis the fused
    path takes and a longer one (float64: exact to rounding)."""
    taps, sigma = 11, 1.5
    gen = torch.Generator().manual_seed(7)
    shape = [2, 3, 3, 4]
    shape[axis] = length
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = GaussianBlur(length, length, window_size=taps, sigma=sigma, padding="same",
                     dtype=torch.float64, device=torch.device("cpu")).gw
    b = blur_matrix(length, taps, sigma, "same", torch.float64, "cpu")
    ends = compiled_mod.adjoint_ends(taps, sigma, torch.float64, "cpu")
    x_last = x.movedim(axis, -1)  # the axis last, for products with the matrix
    expected = (x_last @ b.T).movedim(-1, axis)
    assert_close(compiled_mod._blur_axis(x, axis, g), expected, rtol=0, atol=1e-12)
    expected_adj = (x_last @ b).movedim(-1, axis)  # B^T applied along the axis
    assert_close(compiled_mod._blur_axis_adjoint(x, axis, g, ends), expected_adj, rtol=0,
                 atol=1e-12)


def test_short_levels_keep_the_blur_operator():
    """Axes blurred by a small matrix, shorter than the fused blur takes, or "valid" padding
    keep ``GaussianBlur``; RetinaNet's P3 and P4 are fused."""
    def blur(h, w, padding="same"):
        return GaussianBlur(h, w, window_size=11, sigma=1.5, padding=padding,
                            dtype=torch.float32, device=torch.device("cpu"))

    fuses = compiled_mod.CompiledKernels.fuses
    assert fuses(blur(100, 168)) and fuses(blur(50, 84))
    assert not fuses(blur(25, 42))  # H by matrix product
    assert not fuses(blur(100, 168, "valid"))


def test_new_level_sizes_reuse_the_compiled_kernels(compile_or_skip, monkeypatch):
    """Sizes are dynamic: levels of other sizes with the same chunk width compile nothing new,
    and the fused path's chunk widths are powers of two (a few widths, not one per size)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled_mod, "COMPILED", compiled_mod.CompiledKernels())
    gen = torch.Generator().manual_seed(8)
    for i, (h, w) in enumerate([(60, 64), (52, 70), (40, 90)]):
        x = torch.randn(2, 16, h, w, generator=gen)
        _value_and_grads(x, torch.randn(x.shape, generator=gen), {}, compiled=True, both=False)
        if compiled_mod.CompiledKernels.failed:
            pytest.skip("torch.compile could not build the CPU kernels here")
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert set(compiled_mod.COMPILED._fns) == FUSED
    assert counters["stats"]["unique_graphs"] == graphs
    fused_blur = GaussianBlur(60, 64, window_size=11, sigma=1.5, padding="same",
                              dtype=torch.float32, device=torch.device("cpu"))
    widths = [compiled_mod.COMPILED.chunk_channels(s, fused_blur) for s in (8, 16, 32, 48, 80)]
    assert widths == [8, 16, 32, 64, 64]
    valid = GaussianBlur(60, 64, window_size=11, sigma=1.5, padding="valid",
                         dtype=torch.float32, device=torch.device("cpu"))
    assert compiled_mod.COMPILED.chunk_channels(48, valid) == 48  # not fused: as it comes


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """A compiler error warns once; the call it happened in finishes on the same functions
    uncompiled (equal to float32 rounding), and later calls run the eager kernels (bit for
    bit)."""

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled_mod, "COMPILED", compiled_mod.CompiledKernels())
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    try:
        expected = _value_and_grads(x, y, {}, compiled=False, both=True)
        with pytest.warns(RuntimeWarning, match="torch.compile failed"):
            first = _value_and_grads(x, y, {}, compiled=True, both=True)
        assert compiled_mod.CompiledKernels.failed
        assert not compiled_mod.compile_enabled()
        for a, b in zip(first, expected, strict=True):
            assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
        later = _value_and_grads(x, y, {}, compiled=True, both=True)
        for a, b in zip(later, expected, strict=True):
            assert torch.equal(a, b)
    finally:
        compiled_mod.CompiledKernels.failed = False

