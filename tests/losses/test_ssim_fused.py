"""The fused SSIM distance (``ssim_distance`` / ``SSIMLoss``, ``structkd.losses.ssim.fused``):
values and analytic gradients against kornia's ``ssim_loss``, ``gradcheck`` and plain autograd
through ``ssim_map`` on inputs min-max'd with ``amin``/``amax``; channel chunking, small levels,
mixed precision, input errors and the golden values of ``tests/golden/losses.json``."""

from __future__ import annotations

import math

import kornia
import numpy as np
import pytest
import torch
from loss_helpers import (
    F64,
    FUSED,
    GENERAL,
    GOLDEN,
    NORMALIZE,
    PADDINGS,
    REF,
    golden_options,
    grads,
    pair,
    rand,
    ref_distance,
    ref_minmax,
    to_np,
)
from torch.autograd import gradcheck
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import structkd.losses.ssim.fused as fused_mod
from structkd.losses import SSIMLoss, ssim_distance, ssim_map
from structkd.losses.ssim import window_taps

# --------------------------------------------------------------------------- kornia


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", ["rand", "randn"])
def test_distance_without_normalisation_equals_kornia_ssim_loss(padding, kind):
    """ssim_distance(normalize=None) is kornia's ssim_loss: mean((1 - SSIM) / 2), fused grads."""
    x, y = pair((2, 3, 14, 13), 23, kind=kind)

    def theirs(a, b):
        return kornia.losses.ssim_loss(a, b, 11, eps=0.0, padding=padding)

    def ours(a, b):
        return ssim_distance(a, b, normalize=None, padding=padding)

    v1, g1 = grads(theirs, x, y)
    v2, g2 = grads(ours, x, y)
    assert_close(v2, v1, rtol=0, atol=1e-13)
    for a, b in zip(g2, g1, strict=True):
        assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("normalize", ["minmax", "minmax_channel"])
def test_distance_with_minmax_equals_kornia_on_minmaxed_inputs(normalize):
    x, y = pair((2, 4, 12, 12), 24)

    def theirs(a, b):
        return kornia.losses.ssim_loss(ref_minmax(a, normalize), ref_minmax(b, normalize), 11,
                                       eps=0.0)

    v1, g1 = grads(theirs, x, y)
    v2, g2 = grads(lambda a, b: ssim_distance(a, b, normalize=normalize), x, y)
    assert_close(v2, v1, rtol=0, atol=1e-13)
    for a, b in zip(g2, g1, strict=True):
        assert_close(a, b, rtol=0, atol=1e-12)


def test_float32_distance_close_to_kornia():
    x, y = pair((2, 8, 24, 24), 25, dtype=torch.float32, kind="rand")
    v1, g1 = grads(lambda a, b: kornia.losses.ssim_loss(a, b, 11), x, y)
    v2, g2 = grads(lambda a, b: ssim_distance(a, b, normalize=None), x, y)
    assert v2.dtype == torch.float32
    assert_close(v2, v1, rtol=1e-5, atol=1e-7)
    for a, b in zip(g2, g1, strict=True):
        assert_close(a, b, rtol=1e-3, atol=1e-9)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("shape", [(1, 2, 2, 3), (2, 3, 4, 4)])
@pytest.mark.parametrize("components", FUSED)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_fused(normalize, padding, components, shape):
    x, y = pair(shape, 30)
    x.requires_grad_()
    y.requires_grad_()
    assert gradcheck(
        lambda a, b: ssim_distance(a, b, normalize=normalize, padding=padding,
                                   components=components),
        (x, y),
    )


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (1, 1, 7, 11)])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_fused_small_levels(normalize, padding, shape):
    x, y = pair(shape, 31)
    x.requires_grad_()
    y.requires_grad_()
    assert gradcheck(lambda a, b: ssim_distance(a, b, normalize=normalize, padding=padding),
                     (x, y))


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_gradcheck_fused_one_side(which):
    x, y = pair((2, 3, 4, 5), 32)
    if which == "student":
        x.requires_grad_()
        assert gradcheck(lambda a: ssim_distance(a, y), (x,))
    else:
        y.requires_grad_()
        assert gradcheck(lambda b: ssim_distance(x, b), (y,))


@pytest.mark.parametrize("components", GENERAL)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_general(normalize, padding, components):
    # non-negative inputs: l ** 0.5 needs l >= 0, which min-max guarantees and raw data may not
    x, y = pair((1, 2, 3, 4), 33, kind="rand")
    x.requires_grad_()
    y.requires_grad_()
    assert gradcheck(
        lambda a, b: ssim_distance(a, b, normalize=normalize, padding=padding,
                                   components=components),
        (x, y),
    )


# --------------------------------------------------------------------------- fused vs general


@pytest.mark.parametrize("components", FUSED)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_fused_matches_autograd_reference(normalize, padding, components):
    x, y = pair((2, 3, 9, 10), 40)
    kw = {"padding": padding, "components": components}
    v1, g1 = grads(lambda a, b: ref_distance(a, b, normalize, **kw), x, y)
    v2, g2 = grads(lambda a, b: ssim_distance(a, b, normalize=normalize, **kw), x, y)
    assert_close(v2, v1, rtol=0, atol=1e-14)
    for a, b in zip(g2, g1, strict=True):
        assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_fused_chunking(normalize, monkeypatch):
    """Channel chunks (2 + 2 + 1 here) give the same value and gradients as one chunk."""
    x, y = pair((2, 5, 6, 7), 41)
    expected = grads(lambda a, b: ref_distance(a, b, normalize), x, y)
    monkeypatch.setattr(fused_mod, "CHUNK_ELEMENTS", 2 * 6 * 7 * 2)
    assert fused_mod._chunk_size(x) == 2
    v, g = grads(lambda a, b: ssim_distance(a, b, normalize=normalize), x, y)
    assert_close(v, expected[0], rtol=0, atol=1e-14)
    for a, b in zip(g, expected[1], strict=True):
        assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("normalize", ["minmax", "minmax_channel"])
def test_fused_non_contiguous_inputs(normalize):
    """argmin/argmax index a contiguous copy; gradients must land on the right elements."""
    base_x, base_y = pair((2, 3, 9, 8), 42)
    x = base_x.transpose(2, 3)
    base_y = base_y.transpose(2, 3).contiguous()
    y = base_y.contiguous(memory_format=torch.channels_last)
    xs = x.detach().requires_grad_()
    ys = y.detach().requires_grad_()
    ssim_distance(xs, ys, normalize=normalize).backward()
    _, (gx, gy) = grads(lambda a, b: ref_distance(a, b, normalize), x.contiguous(),
                        y.contiguous())
    assert_close(xs.grad, gx, rtol=0, atol=1e-14)
    assert_close(ys.grad, gy, rtol=0, atol=1e-14)


def test_module_equals_function():
    x, y = pair((2, 3, 9, 10), 43)
    opts = {"padding": "valid", "components": (0, 1, 1), "normalize": "minmax_channel",
            "window_size": 7, "sigma": 1.2}
    assert_close(SSIMLoss(**opts)(x, y), ssim_distance(x, y, **opts), rtol=0, atol=0)
    assert "padding='valid'" in repr(SSIMLoss(**opts))


@pytest.mark.parametrize("components", FUSED + GENERAL)
def test_distance_range_and_symmetry(components):
    x, y = pair((2, 3, 9, 10), 44, rho=0.3)
    d = ssim_distance(x, y, components=components)
    assert 0 < float(d) < 1
    assert_close(ssim_distance(y, x, components=components), d, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- small levels


SMALL = [(1, 1), (1, 5), (2, 2), (3, 4), (5, 5), (7, 11)]


@pytest.mark.parametrize(("h", "w"), SMALL)
@pytest.mark.parametrize("padding", PADDINGS)
def test_small_levels(h, w, padding):
    """Levels smaller than the window: finite values and gradients, 0 for identical maps,
    > 0 for different ones, and the numpy reference with the same truncated windows."""
    x, y = pair((2, 3, h, w), 70, rho=0.5)
    no_blur = window_taps(h, 11, padding) == window_taps(w, 11, padding) == 1
    assert no_blur == ((h, w) == (1, 1) or ((h, w) == (2, 2) and padding == "valid"))
    np.testing.assert_allclose(ssim_map(x, y, padding=padding).numpy(),
                               REF.np_ssim_map(to_np(x), to_np(y), padding=padding),
                               rtol=0, atol=1e-12)
    for normalize in ("minmax", None):
        for components in ((1, 1, 1), (0, 1, 1), (0, 0, 1)):
            kw = {"normalize": normalize, "padding": padding, "components": components}
            v, g = grads(lambda a, b, kw=kw: ssim_distance(a, b, **kw), x, y)
            assert math.isfinite(float(v))
            assert all(bool(t.isfinite().all()) for t in g)
            # The general path takes sd = sqrt(max(var, 1e-12)): where var = 0 the structure
            # term is C3 / (C3 + 1e-12), a distance of 1e-12 / (2 (C3 + 1e-12)) = 1.1e-9.
            floor = 1e-12 / (2 * (0.03**2 / 2 + 1e-12)) if components == (0, 0, 1) else 0.0
            if no_blur and components[0] == 0:
                # 1 tap in both directions: var = cov = 0, so c = s = C/C = 1 and only the
                # luminance term can see a difference (documented degeneracy)
                assert float(v) == pytest.approx(floor, rel=1e-6, abs=1e-15)
            else:
                assert float(v) > 1e-4
            same = ssim_distance(x, x.clone(), **kw)
            assert abs(float(same)) <= (floor if h * w == 1 or no_blur else 0) + 1e-12


def test_per_channel_minmax_of_single_pixels_is_zero():
    """Documented consequence: per-channel min-max of a 1x1 level maps every value to 0, so
    the distance of that level is 0 whatever the inputs (per-sample min-max is not)."""
    x, y = pair((2, 3, 1, 1), 72, rho=0.0)
    assert float(ssim_distance(x, y, normalize="minmax_channel")) == 0.0
    assert float(ssim_distance(x, y, normalize="minmax")) > 0.01


# --------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("components", [(1, 1, 1), (0, 0, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_fp32_loss(dtype, components):
    s, t = pair((2, 4, 9, 10), 80, dtype=torch.float32)
    s, t = s.to(dtype).requires_grad_(), t.to(dtype)
    loss = ssim_distance(s, t, components=components)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == dtype
    s32 = s.detach().float().requires_grad_()
    ref = ssim_distance(s32, t.float(), components=components)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=0)
    assert_close(s.grad, s32.grad.to(dtype), rtol=0, atol=0)
    assert ssim_map(s.detach(), t).dtype == torch.float32


def test_autocast_bf16_features_give_fp32_loss():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    images = rand((2, 3, 10, 11), 81, dtype=torch.float32)
    teacher = rand((2, 4, 10, 11), 82, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = conv(images)
        assert feats.dtype == torch.bfloat16
        loss = ssim_distance(feats, teacher.bfloat16())
        smap = ssim_map(feats, teacher)
    assert loss.dtype == torch.float32
    assert smap.dtype == torch.float32
    ref = ssim_distance(feats.detach().float(), teacher.bfloat16().float())
    assert_close(loss.detach(), ref, rtol=1e-6, atol=0)
    loss.backward()
    assert conv.weight.grad is not None
    assert conv.weight.grad.dtype == torch.float32
    assert bool(conv.weight.grad.isfinite().all())


def test_float64_stays_float64():
    x, y = pair((1, 2, 8, 8), 83)
    assert ssim_distance(x, y).dtype == F64
    assert ssim_map(x, y).dtype == F64


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [ssim_distance, ssim_map, SSIMLoss()])
def test_input_errors(fn):
    x = torch.rand(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"student shape \(1, 2, 8, 8\) != teacher shape "
                                         r"\(1, 2, 8, 9\)"):
        fn(x, torch.rand(1, 2, 8, 9))
    with pytest.raises(ValueError, match=r"student has shape \(2, 8, 8\) \(rank 3\)"):
        fn(torch.rand(2, 8, 8), torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match=r"teacher has shape \(1, 1, 2, 8, 8\) \(rank 5\)"):
        fn(x, torch.rand(1, 1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"student has dtype torch.int64"):
        fn(torch.ones(1, 2, 8, 8, dtype=torch.int64), x)
    with pytest.raises(ValueError, match=r"teacher has dtype torch.uint8"):
        fn(x, torch.ones(1, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"student has shape \(0, 2, 8, 8\) with no elements"):
        fn(torch.rand(0, 2, 8, 8), torch.rand(0, 2, 8, 8))


def _nonfinite_cases():
    for value in ("nan", "inf", "-inf"):
        for normalize in NORMALIZE:
            for components in ((1, 1, 1), (0, 0, 1)):
                for who in ("student", "teacher"):
                    yield pytest.param(value, normalize, components, who,
                                       id=f"{value}-{normalize}-{''.join(map(str, components))}"
                                          f"-{who}")


@pytest.mark.parametrize(("value", "normalize", "components", "who"), list(_nonfinite_cases()))
def test_nonfinite_inputs_raise(value, normalize, components, who):
    x, y = pair((2, 3, 6, 7), 90)
    (x if who == "student" else y)[1, 2, 3, 4] = float(value)
    with pytest.raises(ValueError, match=f"{who} contains NaN or Inf"):
        ssim_distance(x, y, normalize=normalize, components=components)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_nonfinite_inputs_raise_in_ssim_map_and_pass_with_check_off(normalize):
    x, y = pair((1, 2, 6, 7), 91)
    x[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="student contains NaN or Inf"):
        ssim_map(x, y)
    # check_finite=False skips the scan: the result is NaN rather than an error
    assert math.isnan(float(ssim_distance(x, y, normalize=normalize, check_finite=False)))


# --------------------------------------------------------------------------- known src issues


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_no_gradient_work_under_no_grad():
    """Validation losses under no_grad must not pay for the fused gradient."""
    x, y = pair((1, 4, 16, 16), 93)
    forward_only = _flops(lambda: ssim_distance(x, y))
    assert forward_only > 0
    x.requires_grad_()
    assert _flops(lambda: ssim_distance(x, y)) > forward_only  # the gradient costs convolutions
    with torch.no_grad():
        assert _flops(lambda: ssim_distance(x, y)) == forward_only


def test_double_backward_is_correct_or_refused():
    """The fused gradient is formed in the forward pass; double backward must not be silent."""
    x, y = pair((1, 2, 6, 7), 94, kind="rand")

    def hessian_row(fn):
        a = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(fn(a) + (a**3).sum(), a, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), a)
        return h

    expected = hessian_row(lambda a: ref_distance(a, y, None))
    try:
        got = hessian_row(lambda a: ssim_distance(a, y, normalize=None))
    except RuntimeError:
        return  # refusing double backward loudly is acceptable
    assert_close(got, expected, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- golden values


@pytest.mark.parametrize("entry", GOLDEN["ssim_distance"], ids=lambda e: e["id"])
def test_golden_ssim_distance(entry):
    cache: dict = {}
    s, t = REF.make_input(entry["student"], cache), REF.make_input(entry["teacher"], cache)
    opts = golden_options(entry)
    # float64: compared far tighter than needed (measured agreement ~1e-15)
    assert float(ssim_distance(s.double(), t.double(), **opts)) == pytest.approx(
        entry["expected"], rel=1e-9)
    # float32 (the production dtype): rounding reaches ~2e-6 relative on the "valid" entries,
    # which average only 36 output pixels; 1e-6 holds for the others
    rel = 5e-6 if opts.get("padding") == "valid" else 1e-6
    assert float(ssim_distance(s, t, **opts)) == pytest.approx(entry["expected"], rel=rel)


# --------------------------------------------------------------------------- backward


def test_backward_weighted_and_retained_graph():
    """The saved gradient is returned as is for grad_out == 1 (no copy): repeated backward with
    retain_graph accumulates correctly, and a weighted loss scales the gradient."""
    x, y = pair((2, 3, 36, 40), 90)
    x.requires_grad_()
    loss = ssim_distance(x, y)
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    assert_close(x.grad, 3 * g1, rtol=0, atol=1e-18)
    x.grad = None
    (2.5 * ssim_distance(x, y)).backward()
    assert_close(x.grad, 2.5 * g1, rtol=1e-15, atol=0)
    _, (g_ref, _) = grads(lambda a, b: ref_distance(a, b, "minmax"), x.detach(), y)
    assert_close(g1, g_ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_fused_convolution_path_with_chunks_matches_reference(normalize, padding, monkeypatch):
    """Axes longer than MATMUL_MAX (the convolution blur with its reflected border), chunked
    channels over the reused workspaces (2 + 2 + 1), both inputs needing gradients."""
    x, y = pair((2, 5, 35, 41), 91)
    expected = grads(lambda a, b: ref_distance(a, b, normalize, padding=padding), x, y)
    monkeypatch.setattr(fused_mod, "CHUNK_ELEMENTS", 2 * 35 * 41 * 2)
    v, g = grads(lambda a, b: ssim_distance(a, b, normalize=normalize, padding=padding), x, y)
    assert_close(v, expected[0], rtol=0, atol=1e-14)
    for a, b in zip(g, expected[1], strict=True):
        assert_close(a, b, rtol=0, atol=1e-14)
