"""The reference SSIM map (``ssim_map``, plain autograd) against independent implementations.

References: scikit-image (``structural_similarity``, "valid" region), pytorch-msssim 1.0 ("valid"
padding), kornia 0.9 (reflect padding, "same"), and the float64 numpy implementation in
``tests/golden/make_golden.py`` (separate luminance / contrast / structure terms, truncated
windows); gradients against pytorch-msssim's and kornia's autograd."""

from __future__ import annotations

import kornia
import numpy as np
import pytest
import pytorch_msssim
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
    to_np,
)
from skimage.metrics import structural_similarity
from torch.testing import assert_close

from structkd.losses import ssim_distance, ssim_map
from structkd.losses.ssim import window_taps

# --------------------------------------------------------------------------- scikit-image


def skimage_full(x, y, *, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03):
    return structural_similarity(
        x, y, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
        data_range=data_range, K1=k1, K2=k2, full=True,
    )


@pytest.mark.parametrize(("shape", "seed"), [((32, 40), 0), ((23, 17), 1)])
def test_valid_map_matches_skimage(shape, seed):
    x, y = pair(shape, seed, kind="rand")
    ours = ssim_map(x[None, None], y[None, None], padding="valid")[0, 0].numpy()
    mean, full = skimage_full(x.numpy(), y.numpy())
    # skimage's window with gaussian_weights: radius int(truncate * sigma + 0.5), truncate 3.5.
    win = 2 * int(3.5 * 1.5 + 0.5) + 1
    assert win == 11
    p = (win - 1) // 2
    # skimage itself averages its full map over this crop, so the crop is its window's.
    assert full[p:-p, p:-p].mean() == pytest.approx(mean, abs=1e-14)
    assert ours.shape == (shape[0] - 10, shape[1] - 10) == full[p:-p, p:-p].shape
    np.testing.assert_allclose(ours, full[p:-p, p:-p], rtol=0, atol=1e-10)
    assert abs(ours.mean() - mean) < 1e-10


def test_valid_map_matches_skimage_per_sample_and_channel():
    x, y = pair((2, 3, 14, 15), 2, kind="rand")
    ours = ssim_map(x, y, padding="valid").numpy()
    for b in range(2):
        for c in range(3):
            _, full = skimage_full(x[b, c].numpy(), y[b, c].numpy())
            np.testing.assert_allclose(ours[b, c], full[5:-5, 5:-5], rtol=0, atol=1e-10)


def test_constants_and_sigma_match_skimage():
    """sigma=1.0 (skimage window 9), data_range=2, K1=0.02, K2=0.05 all reach the formula."""
    x, y = pair((20, 21), 3, kind="rand")
    x, y = 2 * x, 2 * y
    mean, full = skimage_full(x.numpy(), y.numpy(), sigma=1.0, data_range=2.0, k1=0.02, k2=0.05)
    assert 2 * int(3.5 * 1.0 + 0.5) + 1 == 9
    ours = ssim_map(x[None, None], y[None, None], padding="valid", window_size=9, sigma=1.0,
                    data_range=2.0, k1=0.02, k2=0.05)[0, 0].numpy()
    np.testing.assert_allclose(ours, full[4:-4, 4:-4], rtol=0, atol=1e-10)
    assert abs(ours.mean() - mean) < 1e-10
    # and the defaults differ measurably, so the options are not ignored
    default = ssim_map(x[None, None], y[None, None], padding="valid", window_size=9, sigma=1.0)
    assert (default[0, 0].numpy() - ours).std() > 1e-4


# --------------------------------------------------------------------------- pytorch-msssim


def msssim_window(channels, dtype=F64):
    """A float64 window from the numpy reference (msssim's own is built in float32)."""
    return torch.from_numpy(REF.gauss(11, 1.5)).to(dtype).view(1, 1, 1, 11).repeat(channels, 1,
                                                                                    1, 1)


@pytest.mark.parametrize("size_average", [False, True])
def test_matches_pytorch_msssim_float64(size_average):
    x, y = pair((2, 3, 20, 24), 10, kind="rand")

    def theirs(a, b):
        return pytorch_msssim.ssim(a, b, data_range=1.0, size_average=size_average, win_size=11,
                                   win_sigma=1.5, win=msssim_window(3)).sum()

    def ours(a, b):
        m = ssim_map(a, b, padding="valid")
        return (m.mean() if size_average else m.mean(dim=(1, 2, 3))).sum()

    per_image = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False,
                                    win=msssim_window(3))
    assert per_image.shape == (2,)
    assert_close(ssim_map(x, y, padding="valid").mean(dim=(1, 2, 3)), per_image, rtol=0,
                 atol=1e-12)
    v1, g1 = grads(theirs, x, y)
    v2, g2 = grads(ours, x, y)
    assert_close(v2, v1, rtol=0, atol=1e-12)
    for a, b in zip(g2, g1, strict=True):
        assert_close(a, b, rtol=0, atol=1e-12)


def test_matches_pytorch_msssim_default_window():
    """With msssim's own float32-built window the values differ by ~2e-7 (window rounding)."""
    x, y = pair((2, 3, 20, 24), 11, kind="rand")
    per_image = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False, win_size=11,
                                    win_sigma=1.5)
    ours = ssim_map(x, y, padding="valid").mean(dim=(1, 2, 3))
    assert_close(ours, per_image, rtol=0, atol=1e-6)
    # float32 inputs, gradients included
    xf, yf = x.float(), y.float()
    _, g1 = grads(lambda a: pytorch_msssim.ssim(a, yf, data_range=1.0, size_average=True), xf)
    v2, g2 = grads(lambda a: ssim_map(a, yf, padding="valid").mean(), xf)
    assert v2.dtype == torch.float32
    assert_close(g2[0], g1[0], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- kornia


@pytest.mark.parametrize("window", [11, 7, 5])
def test_same_map_matches_kornia(window):
    """kornia 0.9 metrics.ssim: reflect padding, sigma 1.5, C1=(0.01L)^2, C2=(0.03L)^2, and
    ``eps`` (default 1e-12) added to the denominator; eps=0.0 removes the only difference."""
    x, y = pair((2, 3, 13, 16), 20, kind="rand")
    w = rand((2, 3, 13, 16), 21)  # a random cotangent for the map's gradient

    def theirs(a, b):
        return (kornia.metrics.ssim(a, b, window, eps=0.0) * w).sum()

    def ours(a, b):
        return (ssim_map(a, b, window_size=window) * w).sum()

    assert_close(ssim_map(x, y, window_size=window), kornia.metrics.ssim(x, y, window, eps=0.0),
                 rtol=0, atol=1e-12)
    v1, g1 = grads(theirs, x, y)
    v2, g2 = grads(ours, x, y)
    assert_close(v2, v1, rtol=0, atol=1e-11)
    for a, b in zip(g2, g1, strict=True):
        assert_close(a, b, rtol=0, atol=1e-11)
    # kornia's default eps=1e-12 shifts the map by < 1e-10 on such data
    diff = (ssim_map(x, y, window_size=window) - kornia.metrics.ssim(x, y, window)).abs().max()
    assert 0 < diff < 1e-10


def test_valid_map_matches_kornia_valid():
    x, y = pair((1, 2, 15, 18), 22, kind="rand")
    assert_close(ssim_map(x, y, padding="valid"),
                 kornia.metrics.ssim(x, y, 11, eps=0.0, padding="valid"), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- components


def test_component_maps_match_their_definitions():
    x, y = pair((2, 2, 12, 11), 50, kind="rand")
    lum, con, st = REF.np_components(to_np(x), to_np(y))
    c1, c2 = 0.01**2, 0.03**2

    def m(components):
        return ssim_map(x, y, components=components).numpy()

    np.testing.assert_allclose(m((1, 0, 0)), lum, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m((0, 1, 0)), con, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m((0, 0, 1)), st, rtol=0, atol=1e-12)
    # l * c * s with C3 = C2 / 2 is the full SSIM ...
    np.testing.assert_allclose(m((1, 1, 1)), lum * con * st, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m((1, 0, 1)), lum * st, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m((0.5, 1, 2)), np.sqrt(lum) * con * np.sign(st) * st**2,
                               rtol=0, atol=1e-12)
    # ... and equals the classic two-factor formula; (0, 1, 1) is its second factor.
    mx, my = REF.np_blur(to_np(x), 11, 1.5, "same"), REF.np_blur(to_np(y), 11, 1.5, "same")
    vx = REF.np_blur(to_np(x * x), 11, 1.5, "same") - mx**2
    vy = REF.np_blur(to_np(y * y), 11, 1.5, "same") - my**2
    cov = REF.np_blur(to_np(x * y), 11, 1.5, "same") - mx * my
    cs = (2 * cov + c2) / (vx + vy + c2)
    np.testing.assert_allclose(m((1, 1, 1)), (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(m((0, 1, 1)), cs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("components", [*FUSED, *GENERAL, (1, 0, 0), (0, 1, 0), (2, 1, 1)])
def test_identical_inputs(components, padding):
    x = rand((2, 3, 12, 13), 51)
    assert_close(ssim_map(x, x, components=components, padding=padding),
                 torch.ones(1, dtype=F64).expand(2, 3, *((12, 13) if padding == "same" else
                                                         (2, 3))),
                 rtol=0, atol=1e-12)
    for normalize in NORMALIZE:
        d = ssim_distance(x, x.clone(), components=components, padding=padding,
                          normalize=normalize)
        assert abs(float(d)) < 1e-12
    xf = x.float()
    assert abs(float(ssim_distance(xf, xf.clone(), components=components))) < 1e-6


def test_anti_correlated_inputs_give_negative_structure():
    x = rand((1, 2, 16, 16), 52, kind="rand")
    y = 1 - x  # cov = -var: s = (C3 - var) / (var + C3)
    _, _, st = REF.np_components(to_np(x), to_np(y))
    s_map = ssim_map(x, y, components=(0, 0, 1))
    np.testing.assert_allclose(s_map.numpy(), st, rtol=0, atol=1e-12)
    assert bool((s_map < 0).all())
    assert bool((ssim_map(x, y, components=(0, 0, 2)) < 0).all())  # the sign is kept
    assert float(ssim_map(x, y).mean()) < 0
    assert float(ssim_distance(x, y, components=(0, 0, 1))) > 0.9
    # min-max maps -x to 1 - z: the distance sees the anti-correlation too
    assert float(ssim_distance(x, -x, components=(0, 1, 1))) > 0.9


# --------------------------------------------------------------------------- small levels


@pytest.mark.parametrize("padding", PADDINGS)
def test_single_pixel_is_luminance_only(padding):
    """A 1x1 map is not blurred: var = cov = 0, c*s = C2/C2, SSIM is the luminance term."""
    x, y = pair((2, 4, 1, 1), 71, kind="rand")
    c1 = 0.01**2
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    assert_close(ssim_map(x, y, padding=padding), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize(("size", "taps"), [(2, 3), (3, 5), (5, 9)])
def test_truncated_square_window_matches_kornia(size, taps):
    """For square maps with "same", the truncated window is kornia's window of that size."""
    x, y = pair((1, 2, size, size), 73, kind="rand")
    assert window_taps(size, 11, "same") == taps
    assert_close(ssim_map(x, y), kornia.metrics.ssim(x, y, taps, eps=0.0), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- golden values


@pytest.mark.parametrize("entry", GOLDEN["ssim_map_mean"], ids=lambda e: e["id"])
def test_golden_ssim_map_mean(entry):
    cache: dict = {}
    s, t = REF.make_input(entry["student"], cache), REF.make_input(entry["teacher"], cache)
    opts = golden_options(entry)
    assert float(ssim_map(s.double(), t.double(), **opts).mean()) == pytest.approx(
        entry["expected"], rel=1e-9)
    assert float(ssim_map(s, t, **opts).mean()) == pytest.approx(entry["expected"], rel=1e-6)
