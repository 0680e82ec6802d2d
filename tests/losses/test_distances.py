"""L1 / MSE baselines and the distance registry: golden values (numpy reference in
``tests/golden/make_golden.py``), gradients, fp32 computation, options (``NormalizeOptions``),
``DISTANCES`` / ``build_distance`` / ``distance_options`` and error messages."""

from __future__ import annotations

import inspect

import pytest
import torch
from loss_helpers import GOLDEN, REF, golden_inputs, pair
from torch.autograd import gradcheck

from structkd.losses import (
    DISTANCES,
    L1Loss,
    MSELoss,
    NormalizeOptions,
    SSIMLoss,
    SSIMOptions,
    build_distance,
    distance_options,
    l1_distance,
    mse_distance,
)

NORMALIZE_DEFAULTS = {"normalize": "minmax", "eps": 1e-6, "check_finite": True}


def test_golden_inputs_are_reproduced():
    """Guards the seeded inputs: if torch's CPU generator changes, regenerate the golden file."""
    cache: dict = {}
    for name, spec in GOLDEN["inputs"].items():
        t = REF.make_input(name, cache)
        assert list(t.shape) == spec["shape"]
        assert t.flatten()[:4].tolist() == spec["first"], name
        assert float(t.double().sum()) == pytest.approx(spec["sum"], rel=1e-12)


@pytest.mark.parametrize(("kind", "fn", "module"), [("l1", l1_distance, L1Loss),
                                                     ("mse", mse_distance, MSELoss)])
@pytest.mark.parametrize("index", range(6))
def test_golden_elementwise(kind, fn, module, index) -> None:
    entry = GOLDEN[kind][index]
    s, t = golden_inputs(entry["student"], entry["teacher"])
    opts = entry["options"]
    assert float(fn(s.double(), t.double(), **opts)) == pytest.approx(entry["expected"], rel=1e-9)
    assert float(module(**opts)(s, t)) == pytest.approx(entry["expected"], rel=1e-5)


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("cls", [L1Loss, MSELoss])
@pytest.mark.parametrize("normalize", ["minmax", "minmax_channel", None])
def test_baseline_gradients(cls, normalize) -> None:
    x, y = pair((2, 3, 5, 6), 5)
    x.requires_grad_()
    assert gradcheck(lambda a: cls(normalize=normalize)(a, y), (x,))


@pytest.mark.parametrize("cls", [L1Loss, MSELoss, SSIMLoss])
def test_baselines_compute_in_fp32_under_bf16(cls) -> None:
    x, y = (t.to(torch.bfloat16) for t in pair((2, 3, 8, 8), 6, dtype=torch.float32))
    out = cls()(x, y)
    assert out.dtype == torch.float32
    ref = cls()(x.float(), y.float())
    assert float(out) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("cls", [L1Loss, MSELoss])
def test_baseline_errors(cls) -> None:
    with pytest.raises(ValueError, match=r"normalize='l2' is not supported"):
        cls(normalize="l2")
    with pytest.raises(ValueError, match=r"student shape \(1, 2, 4, 4\) != teacher shape"):
        cls()(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 5))
    with pytest.raises(ValueError, match=r"teacher has dtype torch.int64"):
        cls()(torch.rand(1, 2, 4, 4), torch.ones(1, 2, 4, 4, dtype=torch.int64))
    bad = torch.rand(1, 2, 4, 4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="student contains NaN or Inf"):
        cls()(bad, torch.rand(1, 2, 4, 4))


@pytest.mark.parametrize(("fn", "cls"), [(l1_distance, L1Loss), (mse_distance, MSELoss)])
def test_baseline_options(fn, cls) -> None:
    """One options dataclass, shared with SSIM: every field accepted at its default, the same
    for the function and the module, unknown names rejected with the valid ones."""
    assert NormalizeOptions.defaults() == NORMALIZE_DEFAULTS
    assert issubclass(SSIMOptions, NormalizeOptions)
    for leading, target in ((["student", "teacher"], fn), ([], cls)):
        params = inspect.signature(target).parameters
        assert list(params) == [*leading, *NORMALIZE_DEFAULTS]
        assert {n: params[n].default for n in NORMALIZE_DEFAULTS} == NORMALIZE_DEFAULTS
    x, y = pair((2, 3, 5, 6), 7)
    expected = fn(x, y)
    for name, default in NORMALIZE_DEFAULTS.items():
        assert torch.equal(fn(x, y, **{name: default}), expected)
        assert torch.equal(cls(**{name: default})(x, y), expected)
    for opts in ({"normalize": "minmax_channel"}, {"normalize": None}, {"eps": 0.5}):
        assert float(fn(x, y, **opts)) != pytest.approx(float(expected), rel=1e-6)
        assert torch.equal(cls(**opts)(x, y), fn(x, y, **opts))
    assert cls(normalize=None).options == NormalizeOptions(normalize=None)
    assert "normalize=None" in repr(cls(normalize=None))
    message = (r"option\(s\) \['window_size'\] are not accepted by the L1/MSE distances; "
               r"expected some of \['check_finite', 'eps', 'normalize'\]")
    with pytest.raises(ValueError, match=message):
        fn(x, y, window_size=7)
    with pytest.raises(ValueError, match=message):
        cls(window_size=7)


# --------------------------------------------------------------------------- registry


def test_registry_and_builder() -> None:
    assert {"ssim": SSIMLoss, "l1": L1Loss, "mse": MSELoss, "l2": MSELoss} == DISTANCES
    assert isinstance(build_distance("l2"), MSELoss)
    assert isinstance(build_distance("l1", normalize=None), L1Loss)
    ssim = build_distance("ssim", window_size=5, padding="valid", components=(0, 0, 1))
    assert isinstance(ssim, SSIMLoss)
    assert ssim.options == SSIMOptions(window_size=5, padding="valid", components=(0, 0, 1))
    x, y = pair((2, 3, 9, 10), 8)
    assert torch.equal(build_distance("ssim", sigma=1.2)(x, y), SSIMLoss(sigma=1.2)(x, y))


def test_distance_options_lists_the_defaults() -> None:
    assert distance_options("ssim") == {
        "window_size": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": 1.0,
        "padding": "same", "components": (1.0, 1.0, 1.0), **NORMALIZE_DEFAULTS,
    }
    assert distance_options("ssim") == SSIMOptions.defaults()
    assert distance_options("l1") == distance_options("mse") == distance_options("l2")
    assert distance_options("l1") == NORMALIZE_DEFAULTS
    for name, cls in DISTANCES.items():  # the modules' signatures show the same options
        params = inspect.signature(cls).parameters
        assert {n: p.default for n, p in params.items()} == distance_options(name)


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("cosine", {}, r"distance='cosine' is unknown; expected one of \['l1', 'l2', 'mse', "
                       r"'ssim'\]"),
        ("l1", {"window_size": 5}, r"option\(s\) \['window_size'\] are not accepted by distance "
                                   r"'l1'; expected some of \['check_finite', 'eps', "
                                   r"'normalize'\]"),
        ("mse", {"padding": "same", "sigma": 1.0}, r"\['padding', 'sigma'\] are not accepted by "
                                                   r"distance 'mse'"),
        ("ssim", {"window": 5}, r"\['window'\] are not accepted by distance 'ssim'; expected "
                                r"some of \['check_finite', 'components', 'data_range', 'eps', "
                                r"'k1', 'k2', 'normalize', 'padding', 'sigma', 'window_size'\]"),
        ("ssim", {"window_size": 4}, r"window_size=4 must be a positive odd integer"),
        ("l2", {"normalize": "zscore"}, r"normalize='zscore' is not supported"),
    ],
)
def test_build_distance_errors(name, options, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_distance(name, **options)


def test_distance_options_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"distance='cosine' is unknown"):
        distance_options("cosine")
