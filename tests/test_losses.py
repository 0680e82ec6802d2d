"""L1 / MSE baselines, min-max normalisation and ``FeatureDistillLoss``: golden values (numpy
reference in ``tests/golden/make_golden.py``), gradients, adapters and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from structkd.losses import (
    DISTANCES,
    FeatureDistillLoss,
    L1Loss,
    MSELoss,
    SSIMLoss,
    build_distance,
    l1_distance,
    minmax_normalize,
    mse_distance,
)
from test_ssim import REF, pair

GOLDEN = json.loads((Path(__file__).parent / "golden" / "losses.json").read_text())
F64 = torch.float64


def _inputs(*names: str) -> list[torch.Tensor]:
    cache: dict = {}
    return [REF.make_input(n, cache) for n in names]


@pytest.mark.parametrize(("kind", "fn", "module"), [("l1", l1_distance, L1Loss),
                                                     ("mse", mse_distance, MSELoss)])
@pytest.mark.parametrize("index", range(6))
def test_golden_elementwise(kind, fn, module, index) -> None:
    entry = GOLDEN[kind][index]
    s, t = _inputs(entry["student"], entry["teacher"])
    opts = entry["options"]
    assert float(fn(s.double(), t.double(), **opts)) == pytest.approx(entry["expected"], rel=1e-9)
    assert float(module(**opts)(s, t)) == pytest.approx(entry["expected"], rel=1e-5)


@pytest.mark.parametrize("entry", GOLDEN["feature_distill"], ids=lambda e: e["id"])
def test_golden_feature_distill(entry) -> None:
    """Adapter (a given 1x1 conv), distance per level, sum over levels, times lambda."""
    levels = entry["levels"]
    students = _inputs(*(f"{lv}_s" for lv in levels))
    teachers = _inputs(*(f"{lv}_t" for lv in levels))
    w, b = _inputs(entry["adapter_weight"], entry["adapter_bias"])
    loss = FeatureDistillLoss(
        {lv: s.shape[1] for lv, s in zip(levels, students, strict=True)},
        {lv: t.shape[1] for lv, t in zip(levels, teachers, strict=True)},
        distance=entry["distance"], weight=entry["weight"], **entry["options"],
    ).double()
    with torch.no_grad():
        for conv in loss.adapters.values():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
    total, per_level = loss(
        {lv: s.double() for lv, s in zip(levels, students, strict=True)},
        {lv: t.double() for lv, t in zip(levels, teachers, strict=True)},
    )
    assert float(total.detach()) == pytest.approx(entry["expected"], rel=1e-9)
    for lv in levels:
        assert float(per_level[lv]) == pytest.approx(entry["per_level"][lv], rel=1e-9)


# --------------------------------------------------------------------------- min-max


@pytest.mark.parametrize("mode", ["minmax", "minmax_channel"])
def test_minmax_gradient_closed_form(mode) -> None:
    """The closed-form backward equals autograd through amin/amax (gradcheck, float64)."""
    x = torch.randn(2, 3, 4, 5, dtype=F64, requires_grad=True)
    assert gradcheck(lambda t: minmax_normalize(t, mode), (x,))


@pytest.mark.parametrize("mode", ["minmax", "minmax_channel"])
def test_minmax_range_and_constant_maps(mode) -> None:
    x = torch.randn(2, 3, 4, 5, dtype=F64) * 7 + 3
    z = minmax_normalize(x, mode)
    dims = (2, 3) if mode == "minmax_channel" else (1, 2, 3)
    assert torch.allclose(z.amin(dim=dims), torch.zeros((), dtype=F64), atol=1e-12)
    assert torch.allclose(z.amax(dim=dims), torch.ones((), dtype=F64), atol=1e-6)
    const = torch.full((2, 3, 4, 5), 4.0, requires_grad=True)
    zc = minmax_normalize(const, mode)
    assert torch.equal(zc, torch.zeros_like(zc))
    zc.sum().backward()
    assert torch.isfinite(const.grad).all()
    assert minmax_normalize(x, None) is x


def test_minmax_errors() -> None:
    with pytest.raises(ValueError, match=r"normalize='zscore' is not supported"):
        minmax_normalize(torch.rand(1, 1, 2, 2), "zscore")
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\), got shape \(2, 2\)"):
        minmax_normalize(torch.rand(2, 2), "minmax")


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


# --------------------------------------------------------------------------- FeatureDistillLoss


def _feats(channels: dict[str, int], seed: int, sizes=((8, 9), (4, 5), (2, 3))):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(2, c, *hw, generator=g)
            for (name, c), hw in zip(channels.items(), sizes, strict=True)}


def test_adapters_are_registered_identity_initialised_and_trained() -> None:
    loss = FeatureDistillLoss({"a": 4, "b": 4, "c": 4}, {"a": 4, "b": 4, "c": 6})
    params = dict(loss.named_parameters())
    assert set(params) == {f"adapters.{n}.{p}" for n in "abc" for p in ("weight", "bias")}
    eye = torch.eye(4).view(4, 4, 1, 1)
    assert torch.equal(loss.adapters["a"].weight, eye)
    assert torch.equal(loss.adapters["a"].bias, torch.zeros(4))
    assert loss.adapters["c"].weight.shape == (6, 4, 1, 1)
    s = {k: v.requires_grad_() for k, v in _feats({"a": 4, "b": 4, "c": 4}, 0).items()}
    t = {k: v.requires_grad_() for k, v in _feats({"a": 4, "b": 4, "c": 6}, 1).items()}
    total, _ = loss(s, t)
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert all(v.grad is None for v in t.values())  # teacher features are detached
    assert all(v.grad is not None for v in s.values())
    before = loss.adapters["a"].weight.clone()
    opt.step()
    assert not torch.equal(before, loss.adapters["a"].weight)


def test_identity_adapter_sum_over_levels_and_weight() -> None:
    ch = {"p3": 3, "p4": 3, "p5": 3}
    s, t = _feats(ch, 2), _feats(ch, 3)
    loss = FeatureDistillLoss(ch, ch, distance="mse", weight=3.0, adapter="identity")
    assert list(loss.parameters()) == []
    total, per_level = loss(s, t)
    expected = sum(mse_distance(s[k], t[k]) for k in ch)
    assert float(total) == pytest.approx(3.0 * float(expected), rel=1e-6)
    assert list(per_level) == ["p3", "p4", "p5"]
    assert all(not v.requires_grad for v in per_level.values())


def test_list_channels_and_features() -> None:
    """Lists pair levels by position, as dicts pair them by name."""
    loss = FeatureDistillLoss([3, 3], [3, 3], distance="l1", adapter="identity")
    s, t = [torch.rand(1, 3, 4, 4), torch.rand(1, 3, 2, 2)], [torch.rand(1, 3, 4, 4),
                                                                 torch.rand(1, 3, 2, 2)]
    total, per_level = loss(s, t)
    assert list(per_level) == ["0", "1"]
    assert float(total) == pytest.approx(float(l1_distance(s[0], t[0]) + l1_distance(s[1], t[1])))


def test_custom_distance_module_and_options() -> None:
    class Half(nn.Module):
        def forward(self, s, t):
            return 0.5 * (s - t).abs().mean()

    loss = FeatureDistillLoss([2], [2], distance=Half(), adapter="identity")
    s, t = torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)
    assert float(loss([s], [t])[0]) == 0.5
    ssim = FeatureDistillLoss([2], [2], distance="ssim", window_size=5, padding="valid",
                              components=(0, 0, 1))
    assert ssim.distance.config.window_size == 5 and ssim.distance.config.padding == "valid"
    assert set(DISTANCES) == {"ssim", "l1", "mse", "l2"}
    assert isinstance(build_distance("l2"), MSELoss)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"distance": "cosine"}, r"distance='cosine' is unknown; expected one of"),
        ({"distance": "l1", "window_size": 5}, r"\['window_size'\] are not accepted by distance "
                                               r"'l1'"),
        ({"adapter": "mlp"}, r"adapter='mlp' is not supported"),
        ({"weight": -1.0}, r"weight=-1.0 must be >= 0"),
        ({"distance": nn.L1Loss(), "padding": "same"}, r"only accepted with a distance name"),
    ],
)
def test_feature_loss_option_errors(kwargs, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        FeatureDistillLoss([2], [2], **kwargs)


def test_feature_loss_level_errors() -> None:
    with pytest.raises(ValueError, match=r"student levels \['a'\] and teacher levels \['b'\]"):
        FeatureDistillLoss({"a": 2}, {"b": 2})
    with pytest.raises(ValueError, match=r"level 'a' has student 2 vs teacher 3"):
        FeatureDistillLoss({"a": 2}, {"a": 3}, adapter="identity")
    with pytest.raises(ValueError, match=r"student_channels\['a'\]=0; expected a positive int"):
        FeatureDistillLoss({"a": 0}, {"a": 3})
    with pytest.raises(ValueError, match=r"teacher_channels is empty"):
        FeatureDistillLoss([2], [])
    loss = FeatureDistillLoss({"a": 2, "b": 2}, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match=r"levels \['b'\] are missing"):
        loss({"a": torch.rand(1, 2, 4, 4)}, {"a": torch.rand(1, 2, 4, 4),
                                              "b": torch.rand(1, 2, 2, 2)})
    with pytest.raises(ValueError, match=r"teacher features must be a dict or a list"):
        loss({"a": torch.rand(1, 2, 4, 4)}, torch.rand(1, 2, 4, 4))
