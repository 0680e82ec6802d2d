"""The opt-in compiled element-wise kernels of the fused SSIM (``structkd.losses.ssim.fused``,
``set_compile``): value and gradients equal the eager kernels' to float32 rounding (the compiled
loops may contract multiply-adds and sum in another order), and any compiler failure falls back
to the eager kernels. Skipped where ``torch.compile`` cannot build CPU kernels."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import structkd.losses.ssim.fused as fused_mod
from structkd.losses import ssim_distance

# Large enough for the compiled path (a chunk of >= COMPILE_MIN_ELEMENTS) and longer than
# MATMUL_MAX along both axes (the convolution blur).
SHAPE = (2, 16, 60, 64)


def _value_and_grads(x, y, opts, *, compiled, both):
    fused_mod.set_compile(compiled)
    try:
        a = x.detach().clone().requires_grad_()
        b = y.detach().clone().requires_grad_(both)
        loss = ssim_distance(a, b, **opts)
        loss.backward()
        return loss.detach(), a.grad, b.grad
    finally:
        fused_mod.set_compile(None)


@pytest.fixture
def compile_or_skip():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    yield
    fused_mod._Compiled.failed = False


@pytest.mark.parametrize(
    ("opts", "both"),
    [({}, False),  # the benchmark's case: min-max per sample, "same", teacher without gradient
     ({"normalize": "minmax_channel", "padding": "valid", "components": (0, 1, 1)}, True)],
    ids=["default", "channel-valid-cs-both"],
)
def test_compiled_equals_eager(opts, both, compile_or_skip):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=gen)
    y = 0.5 * x + torch.randn(SHAPE, generator=gen)
    assert fused_mod._chunk_size(x) * 2 * 50 * 54 >= fused_mod.COMPILE_MIN_ELEMENTS  # "valid"
    v_e, gx_e, gy_e = _value_and_grads(x, y, opts, compiled=False, both=both)
    v_c, gx_c, gy_c = _value_and_grads(x, y, opts, compiled=True, both=both)
    if fused_mod._Compiled.failed:
        pytest.skip("torch.compile could not build the CPU kernels here")
    assert {"terms", "grad"} <= set(fused_mod._COMPILED._fns)  # the compiled path ran
    # float32: value to 1e-6 relative; gradients to 3e-6 of their largest entry (measured:
    # equal values, gradients within 1e-6: the compiled row sums accumulate in float64)
    assert_close(v_c, v_e, rtol=1e-6, atol=0)
    for g_c, g_e in ((gx_c, gx_e), (gy_c, gy_e)):
        if g_e is None:
            assert g_c is None
            continue
        assert_close(g_c, g_e, rtol=0, atol=3e-6 * float(g_e.abs().max()))


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """A compiler error warns once and leaves the result to the eager kernels."""

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fused_mod, "_COMPILED", fused_mod._Compiled())
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    try:
        expected = _value_and_grads(x, y, {}, compiled=False, both=True)
        with pytest.warns(RuntimeWarning, match="torch.compile failed"):
            got = _value_and_grads(x, y, {}, compiled=True, both=True)
        assert fused_mod._Compiled.failed
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
    finally:
        fused_mod._Compiled.failed = False

