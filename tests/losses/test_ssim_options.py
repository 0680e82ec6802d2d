"""The options of the SSIM distance (``SSIMOptions``), declared once and taken as keyword
arguments by ``ssim_distance``, ``SSIMLoss`` and ``ssim_map``: value checks and their messages,
unknown names, every field accepted with the defaults of the former explicit signatures."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from loss_helpers import F64, pair
from torch.testing import assert_close

from structkd.losses import SSIMLoss, SSIMOptions, ssim_distance, ssim_map
from structkd.losses.ssim import PADDINGS

# The options and defaults of ``ssim_distance`` / ``SSIMLoss`` before they were declared once;
# ``ssim_map`` took the first seven and compared the maps as given (no normalisation).
DEFAULTS = {
    "window_size": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": 1.0,
    "padding": "same", "components": (1.0, 1.0, 1.0), "normalize": "minmax", "eps": 1e-6,
    "check_finite": True,
}
MAP_DEFAULTS = {**DEFAULTS, "normalize": None}
# A value other than the default for each option (check_finite does not change the value).
OTHER = {
    "window_size": 7, "sigma": 1.0, "k1": 0.1, "k2": 0.05, "data_range": 2.0,
    "padding": "valid", "components": (0, 1, 1), "normalize": "minmax_channel", "eps": 0.1,
    "check_finite": False,
}
VALID_NAMES = (r"expected some of \['check_finite', 'components', 'data_range', 'eps', 'k1', "
               r"'k2', 'normalize', 'padding', 'sigma', 'window_size'\]")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"window_size": 4}, r"window_size=4 must be a positive odd integer"),
        ({"window_size": 0}, r"window_size=0 must be a positive odd integer"),
        ({"window_size": -3}, r"window_size=-3 must be a positive odd integer"),
        ({"window_size": 11.0}, r"window_size=11.0 must be an int"),
        ({"sigma": 0.0}, r"sigma=0.0 must be > 0"),
        ({"sigma": -1.5}, r"sigma=-1.5 must be > 0"),
        ({"sigma": float("nan")}, r"sigma=nan must be > 0"),
        ({"padding": "reflect"}, r"padding='reflect' is not supported"),
        ({"normalize": "zscore"}, r"normalize='zscore' is not supported"),
        ({"components": (1, 1)}, r"components=\(1, 1\) must be three"),
        ({"components": (1, 1, 1, 1)}, r"components=\(1, 1, 1, 1\) must be three"),
        ({"components": (1, -1, 1)}, r"components=\(1, -1, 1\) must be three finite"),
        ({"components": (1, float("inf"), 1)}, r"components=\(1, inf, 1\)"),
        ({"components": (0, 0, 0)}, r"components=\(0, 0, 0\) leaves nothing"),
        ({"data_range": 0.0}, r"data_range=0.0 must be > 0"),
        ({"k1": 0.0}, r"k1=0.0 must be > 0"),
        ({"k2": -0.03}, r"k2=-0.03 must be > 0"),
    ],
)
def test_option_errors(kwargs, pattern):
    x, y = pair((1, 2, 8, 8), 92)
    with pytest.raises(ValueError, match=pattern):
        ssim_distance(x, y, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        SSIMLoss(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        ssim_map(x, y, **kwargs)


def test_options_are_declared_once_with_the_former_defaults():
    assert SSIMOptions.defaults() == DEFAULTS
    assert SSIMOptions.names() == [*DEFAULTS]
    assert PADDINGS == ("same", "valid")
    for fn, leading, defaults in ((ssim_distance, ["student", "teacher"], DEFAULTS),
                                  (SSIMLoss, [], DEFAULTS), (ssim_map, ["x", "y"], MAP_DEFAULTS)):
        params = inspect.signature(fn).parameters
        assert list(params) == [*leading, *defaults], fn
        assert {n: p.default for n, p in params.items() if n not in leading} == defaults, fn
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in defaults)


@pytest.mark.parametrize("name", [*DEFAULTS])
def test_every_option_is_accepted_with_its_default(name):
    """Each option passed explicitly at its default gives exactly the result of no options."""
    x, y = pair((2, 3, 9, 10), 95)
    opt = {name: DEFAULTS[name]}
    expected = ssim_distance(x, y)
    assert torch.equal(ssim_distance(x, y, **opt), expected)
    assert torch.equal(SSIMLoss(**opt)(x, y), expected)
    assert SSIMLoss(**opt).options == SSIMLoss().options == SSIMOptions()
    assert torch.equal(ssim_map(x, y, **{name: MAP_DEFAULTS[name]}), ssim_map(x, y))


@pytest.mark.parametrize("name", [*OTHER])
def test_every_option_reaches_the_result(name):
    """A non-default value of each option is used by all three entry points alike."""
    x, y = pair((2, 3, 9, 10), 96, kind="rand")
    opt = {name: OTHER[name]}
    value = ssim_distance(x, y, **opt)
    if name != "check_finite":
        assert abs(float(value) - float(ssim_distance(x, y))) > 1e-5
    assert torch.equal(SSIMLoss(**opt)(x, y), value)
    # the reference map with the same options (normalisation included) gives the same distance
    normalize = {"normalize": "minmax", **opt}
    assert_close(((1 - ssim_map(x, y, **normalize)) / 2).mean(), value, rtol=0, atol=1e-14)


def test_options_object():
    opts = SSIMOptions(components=(0, 1, 1), k1=0.02, data_range=2.0)
    assert opts.components == (0.0, 1.0, 1.0) and all(type(c) is float for c in opts.components)
    assert opts.fused and not SSIMOptions(components=(1, 0, 1)).fused
    assert opts.c1 == pytest.approx(0.04**2) and opts.c2 == pytest.approx(0.06**2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.sigma = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        SSIMOptions(11)  # type: ignore[misc]  # keyword-only
    blur = opts.blur(torch.zeros(1, 1, 5, 40, dtype=F64))
    assert (blur.kh, blur.kw) == (9, 11)
    assert SSIMOptions.from_kwargs(window_size=7) == SSIMOptions(window_size=7)
    assert SSIMLoss(window_size=7, normalize=None).options == SSIMOptions(window_size=7,
                                                                         normalize=None)


@pytest.mark.parametrize("fn", ["ssim_distance", "ssim_map", "SSIMLoss", "from_kwargs"])
def test_unknown_option_is_rejected_with_the_valid_names(fn):
    x, y = pair((1, 2, 8, 8), 97)
    call = {
        "ssim_distance": lambda **o: ssim_distance(x, y, **o),
        "ssim_map": lambda **o: ssim_map(x, y, **o),
        "SSIMLoss": lambda **o: SSIMLoss(**o),
        "from_kwargs": lambda **o: SSIMOptions.from_kwargs(**o),
    }[fn]
    with pytest.raises(ValueError, match=r"option\(s\) \['windowsize'\] are not accepted by "
                                         r"the SSIM distance; " + VALID_NAMES):
        call(windowsize=7)
    with pytest.raises(ValueError, match=r"\['reduction', 'size'\] are not accepted"):
        call(window_size=7, size=3, reduction="mean")
