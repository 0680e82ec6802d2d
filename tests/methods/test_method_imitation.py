"""Feature imitation (``structkd.methods.imitation``): the distance applied level by level after
each level's adapter, the adapters, build errors, and ``losses.json``'s values."""

from __future__ import annotations

import re

import pytest
import torch
from method_helpers import F64, IMITATION, LOSS_REF, LOSSES_GOLDEN
from torch.testing import assert_close

from structkd.losses import build_distance
from structkd.methods import DistillContext, Level, build_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


# --------------------------------------------------------------------------- imitation


def _imitation_and_adapters(distance: str, levels: list[Level], weight: float, **options):
    """The imitation method with random 1x1 adapters, and the same adapters on their own."""
    method = build_method(distance, levels, weight=weight, **options).double()
    gen = torch.Generator().manual_seed(3)
    adapters = {}
    with torch.no_grad():
        for lv in levels:
            w = torch.randn(lv.teacher_channels, lv.student_channels, 1, 1, generator=gen,
                            dtype=F64)
            b = torch.randn(lv.teacher_channels, generator=gen, dtype=F64)
            method.adapters[lv.name].weight.copy_(w)
            method.adapters[lv.name].bias.copy_(b)
            adapters[lv.name] = (w, b)
    return method, adapters


@pytest.mark.parametrize("distance", IMITATION)
@pytest.mark.parametrize("options", [{}, {"normalize": "minmax_channel"}, {"normalize": None}],
                         ids=["minmax", "channel", "none"])
def test_imitation_is_the_weighted_sum_of_the_distance_per_level(distance, options) -> None:
    """``weight * sum_r D(phi_r(S_r), T_r)``: the distance applied level by level after each
    level's 1x1 adapter, computed here with plain conv2d and the distance alone."""
    levels = [Level("a", 8, 3, 4), Level("b", 16, 3, 4), Level("c", 32, 4, 4)]
    method, adapters = _imitation_and_adapters(distance, levels, 2.5, **options)
    d = build_distance(distance, **options)
    gen = torch.Generator().manual_seed(4)
    sizes = {"a": (9, 7), "b": (5, 4), "c": (1, 1)}
    s = {lv.name: torch.randn(2, lv.student_channels, *sizes[lv.name], generator=gen, dtype=F64)
         for lv in levels}
    t = {lv.name: torch.randn(2, lv.teacher_channels, *sizes[lv.name], generator=gen, dtype=F64)
         for lv in levels}
    out = method(DistillContext(s, t, {lv.name: lv for lv in levels}, (72, 56)))
    per_level = {n: d(torch.nn.functional.conv2d(s[n], *adapters[n]), t[n]) for n in s}
    assert list(out) == ["distill"]
    assert_close(out["distill"], 2.5 * (per_level["a"] + per_level["b"] + per_level["c"]),
                 rtol=1e-12, atol=1e-14)
    for name, value in per_level.items():  # "c" is 1x1: 0 up to rounding
        assert_close(method.level_values[name], value, rtol=1e-12, atol=1e-14)
        assert not method.level_values[name].requires_grad


def test_imitation_adapters_are_registered_identity_initialised_and_trained() -> None:
    levels = [Level("same", 8, 4, 4), Level("wider", 16, 2, 4)]
    method = build_method("ssim", levels)
    same = method.adapters["same"]
    assert isinstance(same, torch.nn.Conv2d)  # "conv1x1": also where the widths match
    assert torch.equal(same.weight[:, :, 0, 0], torch.eye(4)) and same.bias.eq(0).all()
    names = {n for n, _ in method.named_parameters()}
    assert {"adapters.same.weight", "adapters.wider.weight", "adapters.wider.bias"} <= names
    gen = torch.Generator().manual_seed(0)
    s = {"same": torch.randn(2, 4, 12, 12, generator=gen, requires_grad=True),
         "wider": torch.randn(2, 2, 6, 6, generator=gen, requires_grad=True)}
    t = {"same": torch.randn(2, 4, 12, 12, generator=gen, requires_grad=True),
         "wider": torch.randn(2, 4, 6, 6, generator=gen, requires_grad=True)}
    out = method(DistillContext(s, t, method.levels, (96, 96)))
    out["distill"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert all(x.grad is not None for x in s.values())
    assert all(x.grad is None for x in t.values())  # the teacher's maps are detached


@pytest.mark.parametrize(("options", "levels", "message"), [
    ({"adapter": "mlp"}, [Level("a", 8, 4, 4)], "adapter='mlp' is not supported"),
    ({"weight": -1.0}, [Level("a", 8, 4, 4)], "weight=-1.0 is invalid"),
    ({"adapter": "identity"}, [Level("a", 8, 2, 3)],
     "level 'a' has student 2 vs teacher 3"),
])
def test_imitation_build_errors(options, levels, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_method("ssim", levels, **options)


@pytest.mark.parametrize("entry", LOSSES_GOLDEN["feature_distill"], ids=lambda e: e["id"])
def test_imitation_golden_feature_distill(entry) -> None:
    """``losses.json``'s multi-level feature-distillation values hold through ``build_method``."""
    cache: dict = {}
    names = entry["levels"]
    students = {lv: LOSS_REF.make_input(f"{lv}_s", cache).double() for lv in names}
    teachers = {lv: LOSS_REF.make_input(f"{lv}_t", cache).double() for lv in names}
    levels = [Level(lv, 8 * 2**i, students[lv].shape[1], teachers[lv].shape[1])
              for i, lv in enumerate(names)]
    method = build_method(entry["distance"], levels, weight=entry["weight"],
                          **entry["options"]).double()
    w = LOSS_REF.make_input(entry["adapter_weight"], cache)
    b = LOSS_REF.make_input(entry["adapter_bias"], cache)
    with torch.no_grad():
        for conv in method.adapters.values():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
    h, w_ = students[names[0]].shape[-2:]
    out = method(DistillContext(students, teachers, {lv.name: lv for lv in levels},
                                (8 * h, 8 * w_)))
    assert float(out["distill"].detach()) == pytest.approx(entry["expected"], rel=1e-9)
    for lv in names:
        assert float(method.level_values[lv]) == pytest.approx(entry["per_level"][lv], rel=1e-9)
