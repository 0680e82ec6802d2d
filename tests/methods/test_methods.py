"""The distillation methods (``structkd.methods``): golden values, gradients, padding, registry.

Golden values come from the float64 NumPy reference in ``tests/golden/make_method_golden.py``
(``methods.json``), which never imports structkd; the trainable parts (1x1 adapters, MGD's
generators, FGD's GcBlocks) and MGD's keep masks are inputs of that file, loaded into the modules
here. Feature imitation is checked against the distance applied level by level (the paper's
definition) and ``losses.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck
from torch.testing import assert_close

import structkd.methods.mgd as mgd_mod
from structkd.losses import build_distance
from structkd.methods import (
    ALIASES,
    METHODS,
    DistillContext,
    DistillMethod,
    Level,
    build_method,
    describe_methods,
    method_info,
    register_method,
)
from structkd.methods.base import check_positive
from structkd.methods.fgd import box_masks

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "methods.json").read_text())
LOSSES_GOLDEN = json.loads((GOLDEN_DIR / "losses.json").read_text())
F64 = torch.float64
IMITATION = ["ssim", "l1", "mse"]
ALL = [*IMITATION, "pkd", "cwd", "mgd", "fgd"]
GARBAGE = 1e4


def _load(name: str, file: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GOLDEN_DIR / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


REF = _load("structkd_tests_make_method_golden", "make_method_golden.py")
LOSS_REF = _load("structkd_tests_make_golden", "make_golden.py")  # same name as test_ssim's
_CACHE: dict[str, Tensor] = {}


def inp(name: str) -> Tensor:
    return REF.make_input(name, _CACHE).clone()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


# --------------------------------------------------------------------------- helpers


class FixedMasks:
    """Stands in for ``mgd.random_keep_mask``: returns the given masks in turn (cyclically)."""

    def __init__(self, masks: list[Tensor]) -> None:
        self.masks, self.calls = masks, 0

    def __call__(self, student: Tensor, mask_ratio: float) -> Tensor:
        mask = self.masks[self.calls % len(self.masks)]
        self.calls += 1
        assert mask.shape[0] == student.shape[0] and mask.shape[-2:] == student.shape[-2:]
        return mask.to(student)


def _no_mask(student: Tensor, mask_ratio: float) -> Tensor:
    raise AssertionError("random_keep_mask must not be called with mask_ratio=0")


def case_levels(case: dict) -> list[Level]:
    return [Level(s["name"], s["stride"], s["student_channels"], s["teacher_channels"])
            for s in case["levels"]]


def valid_cells(case: dict, spec: dict, shape) -> list[tuple[int, int]]:
    h, w = shape[-2:]
    if case["image_sizes"] is None:
        return [(h, w)] * shape[0]
    s = spec["stride"]
    return [(min(h, math.ceil(ih / s)), min(w, math.ceil(iw / s)))
            for ih, iw in case["image_sizes"]]


def fill_padding(x: Tensor, cells: list[tuple[int, int]], seed: int) -> Tensor:
    """``x`` with every padded cell replaced by large random garbage."""
    x = x.clone()
    gen = torch.Generator().manual_seed(seed)
    garbage = GARBAGE * torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
    for i, (h, w) in enumerate(cells):
        x[i, :, h:] = garbage[i, :, h:]
        x[i, :, :, w:] = garbage[i, :, :, w:]
    return x


def case_context(case: dict, *, dtype=F64, garbage: bool = True) -> DistillContext:
    student, teacher = {}, {}
    for k, spec in enumerate(case["levels"]):
        s, t = inp(spec["student"]).to(dtype), inp(spec["teacher"]).to(dtype)
        if garbage and case["image_sizes"] is not None:
            cells = valid_cells(case, spec, t.shape)
            s, t = fill_padding(s, cells, 2 * k), fill_padding(t, cells, 2 * k + 1)
        student[spec["name"]], teacher[spec["name"]] = s, t
    sizes = case["image_sizes"]
    return DistillContext(
        student, teacher, {lv.name: lv for lv in case_levels(case)},
        tuple(case["batch_shape"]),
        image_sizes=None if sizes is None else [tuple(x) for x in sizes],
        boxes=[torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in case["boxes"]],
    )


def load_parts(method: DistillMethod, case: dict) -> None:
    """Copy the golden adapters, generators and GcBlocks into ``method``."""
    def put(param: Tensor, name: str) -> None:
        value = inp(name)
        assert param.shape == value.shape, name
        param.copy_(value.to(param))

    with torch.no_grad():
        for spec in case["levels"]:
            n = spec["name"]
            if spec["student_channels"] != spec["teacher_channels"]:
                put(method.adapters[n].weight, spec["adapter_weight"])
                put(method.adapters[n].bias, spec["adapter_bias"])
            if hasattr(method, "generators"):
                gen, g = method.generators[n], spec["generator"]
                put(gen[0].weight, g["conv1_weight"])
                put(gen[0].bias, g["conv1_bias"])
                put(gen[2].weight, g["conv2_weight"])
                put(gen[2].bias, g["conv2_bias"])
            if hasattr(method, "student_context"):
                for side, blocks in (("student", method.student_context),
                                     ("teacher", method.teacher_context)):
                    block, p = blocks[n], spec[f"gc_{side}"]
                    put(block.context_mask.weight, p["context_weight"])
                    put(block.context_mask.bias, p["context_bias"])
                    put(block.transform[0].weight, p["down_weight"])
                    put(block.transform[0].bias, p["down_bias"])
                    put(block.transform[1].weight, p["norm_weight"])
                    put(block.transform[1].bias, p["norm_bias"])
                    put(block.transform[3].weight, p["up_weight"])
                    put(block.transform[3].bias, p["up_bias"])


def golden_method(kind: str, entry: dict) -> tuple[DistillMethod, dict]:
    case = GOLDEN["cases"][entry["case"]]
    method = build_method(kind, case_levels(case), **entry["options"]).double()
    load_parts(method, case)
    return method, case


def keep_masks(case: dict, crop: tuple[int, ...] | None = None) -> list[Tensor]:
    """The golden keep masks of ``case``, per level; ``crop=(i,)`` gives image i's valid part."""
    out = []
    for spec in case["levels"]:
        m = inp(spec["keep"]).to(F64)
        if crop is not None:
            (i,) = crop
            h, w = valid_cells(case, spec, m.shape)[i]
            m = m[i:i + 1, :, :h, :w]
        out.append(m)
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# --------------------------------------------------------------------------- golden values


def test_golden_inputs_unchanged() -> None:
    """torch's CPU generator still draws the inputs the golden values were computed from."""
    for name, spec in GOLDEN["inputs"].items():
        t = REF.make_input(name, _CACHE)
        assert list(t.shape) == spec["shape"], name
        assert t.flatten()[:4].tolist() == spec["first"], name
        assert float(t.double().sum()) == pytest.approx(spec["sum"], rel=1e-12, abs=1e-12), name


def _check_golden(method: DistillMethod, out: dict[str, Tensor], entry: dict) -> None:
    assert set(out) == set(entry["expected"])
    for k, v in entry["expected"].items():
        assert float(out[k].detach()) == pytest.approx(v, rel=1e-10, abs=1e-300), k
    assert method.weight == entry["weight"]
    values = entry.get("level_values", entry["per_level"])
    assert set(method.level_values) == set(values)
    for name, v in values.items():
        got = float(method.level_values[name])
        assert got == pytest.approx(v, rel=1e-10, abs=1e-15), name


@pytest.mark.parametrize("entry", GOLDEN["pkd"], ids=lambda e: e["id"])
def test_golden_pkd(entry) -> None:
    method, case = golden_method("pkd", entry)
    _check_golden(method, method(case_context(case)), entry)


@pytest.mark.parametrize("entry", GOLDEN["cwd"], ids=lambda e: e["id"])
def test_golden_cwd(entry) -> None:
    method, case = golden_method("cwd", entry)
    _check_golden(method, method(case_context(case)), entry)


@pytest.mark.parametrize("entry", GOLDEN["mgd"], ids=lambda e: e["id"])
def test_golden_mgd(entry, monkeypatch) -> None:
    method, case = golden_method("mgd", entry)
    masked = entry["keep_mask"] is not None
    fixed = FixedMasks(keep_masks(case))
    monkeypatch.setattr(mgd_mod, "random_keep_mask", fixed if masked else _no_mask)
    _check_golden(method, method(case_context(case)), entry)
    assert fixed.calls == (len(case["levels"]) if masked else 0)


@pytest.mark.parametrize("entry", GOLDEN["fgd"], ids=lambda e: e["id"])
def test_golden_fgd(entry) -> None:
    method, case = golden_method("fgd", entry)
    resolved = entry["resolved"]
    assert method.temperature == resolved["temperature"]
    assert method.term_weights == {t: resolved[o] for t, o in REF.FGD_TERMS.items()}
    _check_golden(method, method(case_context(case)), entry)


@pytest.mark.parametrize("case_name", sorted(GOLDEN["cases"]))
def test_fgd_box_masks_match_reference(case_name) -> None:
    """Masks from boxes: no boxes, sub-cell boxes, overlaps (max of 1/area), border boxes."""
    case = GOLDEN["cases"][case_name]
    for spec in case["levels"]:
        shape = inp(spec["teacher"]).shape
        for i, (h, w) in enumerate(valid_cells(case, spec, shape)):
            boxes = torch.tensor(case["boxes"][i], dtype=torch.float32).reshape(-1, 4)
            fg, bg = box_masks([boxes / spec["stride"]], h, w, device=torch.device("cpu"),
                               dtype=F64)
            ref_fg, ref_bg = REF.np_box_masks(case["boxes"][i], spec["stride"], h, w)
            assert_close(fg[0], torch.from_numpy(ref_fg), rtol=1e-15, atol=0)
            assert_close(bg[0], torch.from_numpy(ref_bg), rtol=1e-15, atol=0)


def test_fgd_box_mask_conventions() -> None:
    """The conventions spelled out: inclusive floor/ceil extents, smallest box wins."""
    def masks(boxes, h=4, w=4):
        fg, bg = box_masks([torch.tensor(boxes, dtype=F64).reshape(-1, 4)], h, w,
                           device=torch.device("cpu"), dtype=F64)
        return fg[0], bg[0]

    fg, bg = masks([])  # no boxes: all background
    assert torch.equal(fg, torch.zeros(4, 4, dtype=F64))
    assert torch.allclose(bg, torch.full((4, 4), 1 / 16, dtype=F64))
    fg, _ = masks([[1.2, 1.3, 1.6, 1.7]])  # inside one cell: covers rows/cols 1..2
    assert fg[1:3, 1:3].eq(1 / 4).all() and fg.sum() == 1
    fg, _ = masks([[0.0, 0.0, 3.5, 3.5], [1.2, 1.3, 1.6, 1.7]])  # overlap: 1/4 beats 1/25
    assert fg[1, 1] == 1 / 4 and fg[0, 0] == 1 / 25 and fg[3, 3] == 1 / 25
    fg, bg = masks([[0.0, 0.0, 4.0, 4.0]])  # reaches the border: 5x5 cells counted, no bg
    assert fg.eq(1 / 25).all() and bg.eq(0).all()


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


# --------------------------------------------------------------------------- small contexts


def small_context(b: int = 2, sizes=((3, 4), (2, 2)), cs: int = 3, ct: int = 4, *,
                  dtype=F64, seed: int = 0, requires_grad: bool = False):
    """Levels "a" (stride 8) and "b" (stride 16), ... of the given sizes, random boxes."""
    gen = torch.Generator().manual_seed(seed)
    names = "abcdefg"[: len(sizes)]
    levels = [Level(n, 8 * 2**i, cs, ct) for i, n in enumerate(names)]
    s = {n: torch.randn(b, cs, *hw, generator=gen, dtype=F64).to(dtype).requires_grad_(
        requires_grad) for n, hw in zip(names, sizes, strict=True)}
    t = {n: torch.randn(b, ct, *hw, generator=gen, dtype=F64).to(dtype)
         for n, hw in zip(names, sizes, strict=True)}
    h, w = 8 * sizes[0][0], 8 * sizes[0][1]
    boxes = [torch.tensor([[1.0, 2.0, 0.5 * w, 0.7 * h], [0.3 * w, 0.2 * h, w, h]])[: 2 - i % 2]
             for i in range(b)]
    return DistillContext(s, t, {lv.name: lv for lv in levels}, (h, w), boxes=boxes), levels


def randomise(method: DistillMethod, seed: int = 0) -> DistillMethod:
    """Every parameter random (FGD's GcBlocks start as the identity, MGD's generator is random)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=F64).to(p))
    return method


def fixed_mask_for(ctx: DistillContext, levels: list[Level], seed: int = 5) -> FixedMasks:
    gen = torch.Generator().manual_seed(seed)
    return FixedMasks([(torch.rand(ctx.student[lv.name].shape[0], 1,
                                   *ctx.student[lv.name].shape[-2:], generator=gen) > 0.5)
                       .to(F64) for lv in levels])


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name, padded, monkeypatch) -> None:
    ctx, levels = small_context(requires_grad=True)
    if padded:  # image 0 fills the map, image 1 covers 2x3 and 1x2 cells
        ctx.image_sizes = [ctx.batch_shape, (16, 20)]
    method = randomise(build_method(name, levels, weight=1.5).double())
    if name == "mgd":
        monkeypatch.setattr(mgd_mod, "random_keep_mask", fixed_mask_for(ctx, levels))
    inputs = tuple(ctx.student[lv.name] for lv in levels)

    def fn(*students):
        c = DistillContext(dict(zip(ctx.student, students, strict=True)), ctx.teacher,
                           ctx.levels, ctx.batch_shape, ctx.image_sizes, ctx.boxes)
        return sum(method(c).values())

    assert gradcheck(fn, inputs)


# --------------------------------------------------------------------------- padding


def _alone(case: dict, i: int, dtype=F64) -> DistillContext:
    """Image ``i`` of ``case`` alone: a batch of one, its valid crop, its boxes."""
    student, teacher = {}, {}
    for spec in case["levels"]:
        t = inp(spec["teacher"]).to(dtype)
        h, w = valid_cells(case, spec, t.shape)[i]
        student[spec["name"]] = inp(spec["student"]).to(dtype)[i:i + 1, :, :h, :w]
        teacher[spec["name"]] = t[i:i + 1, :, :h, :w]
    ih, iw = case["image_sizes"][i]
    return DistillContext(student, teacher, {lv.name: lv for lv in case_levels(case)}, (ih, iw),
                          boxes=[torch.tensor(case["boxes"][i], dtype=torch.float32)
                                 .reshape(-1, 4)])


@pytest.mark.parametrize("name", ["ssim", "l1", "mse", "cwd", "mgd", "mgd-ratio0", "fgd"])
def test_padded_batch_is_mean_of_images_alone(name, monkeypatch) -> None:
    """Garbage in the padding changes nothing; each image counts as if it were alone."""
    case = GOLDEN["cases"]["padded"]
    kind, options = ("mgd", {"mask_ratio": 0.0}) if name == "mgd-ratio0" else (name, {})
    method = build_method(kind, case_levels(case), **options).double()
    load_parts(method, case)
    if kind in IMITATION:
        randomise(method)  # the adapters: conv1x1 for every level
    masks = name == "mgd"
    if masks:
        monkeypatch.setattr(mgd_mod, "random_keep_mask", FixedMasks(keep_masks(case)))
    padded = {k: float(v.detach()) for k, v in method(case_context(case)).items()}
    padded_levels = {k: float(v) for k, v in method.level_values.items()}
    alone = []
    alone_levels = []
    for i in range(len(case["image_sizes"])):
        if masks:
            monkeypatch.setattr(mgd_mod, "random_keep_mask", FixedMasks(keep_masks(case, (i,))))
        alone.append({k: float(v.detach()) for k, v in method(_alone(case, i)).items()})
        alone_levels.append({k: float(v) for k, v in method.level_values.items()})
    for k, v in padded.items():
        mean = sum(a[k] for a in alone) / len(alone)
        assert rel(v, mean) < 1e-6, (k, v, mean)
    for k, v in padded_levels.items():
        mean = sum(a[k] for a in alone_levels) / len(alone_levels)
        assert rel(v, mean) < 1e-6, (k, v, mean)


def test_padded_pkd_pools_valid_cells() -> None:
    """PKD's batch statistics: the padded loss is PKD on the valid cells of both images pooled,
    not the mean of each image alone (NumPy reference), and garbage does not enter it."""
    case = GOLDEN["cases"]["padded"]
    method = build_method("pkd", case_levels(case), weight=1.0).double()
    load_parts(method, case)
    with torch.no_grad():
        out = float(method(case_context(case))["distill"])
    expected = 0.0
    for spec in case["levels"]:
        s = inp(spec["student"]).double().numpy()
        s = REF.np_conv1x1(s, inp(spec["adapter_weight"]).double().numpy(),
                           inp(spec["adapter_bias"]).double().numpy())
        t = inp(spec["teacher"]).double().numpy()
        cells = valid_cells(case, spec, t.shape)
        v = REF.np_pkd([s[i, :, :h, :w] for i, (h, w) in enumerate(cells)],
                       [t[i, :, :h, :w] for i, (h, w) in enumerate(cells)])
        assert float(method.level_values[spec["name"]]) == pytest.approx(v, rel=1e-10)
        expected += v
    assert out == pytest.approx(expected, rel=1e-10)
    with torch.no_grad():
        alone = [float(method(_alone(case, i))["distill"]) for i in range(2)]
    assert rel(out, sum(alone) / 2) > 1e-3  # batch statistics: not a per-image mean


def test_padded_float32_under_garbage() -> None:
    """float32 features with garbage padding: the same values as float64 (no garbage leaks)."""
    case = GOLDEN["cases"]["padded"]
    for name in ("pkd", "cwd", "fgd", "ssim"):
        m64 = build_method(name, case_levels(case)).double()
        load_parts(m64, case)
        m32 = build_method(name, case_levels(case))
        m32.load_state_dict(m64.state_dict())
        with torch.no_grad():
            v64 = sum(m64(case_context(case)).values())
            v32 = sum(m32(case_context(case, dtype=torch.float32)).values())
        assert torch.isfinite(v32)
        assert float(v32) == pytest.approx(float(v64), rel=1e-4), name


# --------------------------------------------------------------------------- tiny levels


SIZES = [(1, 1), (1, 2), (2, 1), (2, 3), (3, 3), (4, 4)]


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("name", ALL)
def test_tiny_levels_finite(name, b) -> None:
    """Levels of 1x1 to 4x4 cells (batch of one or two): finite losses and gradients."""
    ctx, levels = small_context(b=b, sizes=SIZES, dtype=torch.float32, requires_grad=True)
    method = build_method(name, levels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch.std's "degrees of freedom is <= 0"
        out = method(ctx)
        total = sum(out.values())
        total.backward()
    assert torch.isfinite(total)
    for lv in levels:
        assert torch.isfinite(ctx.student[lv.name].grad).all(), lv
        assert torch.isfinite(method.level_values[lv.name]).all(), lv
    for p in method.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("padded", [False, True])
def test_pkd_degenerate_statistics(padded) -> None:
    """One valid cell (std undefined) gives 0, and a constant student channel a finite gradient,
    with or without padding (regression: NaN before)."""
    s = torch.randn(1, 3, 2, 2, dtype=F64)
    s[:, 1] = 0.25
    s.requires_grad_(True)
    t = torch.randn(1, 3, 2, 2, dtype=F64)
    lv = Level("a", 8, 3, 3)
    sizes = [(16, 16)] if padded else None
    ctx = DistillContext({"a": s}, {"a": t}, {"a": lv}, (16, 16), image_sizes=sizes)
    method = build_method("pkd", [lv])
    loss = method(ctx)["distill"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    one = DistillContext({"a": s}, {"a": t}, {"a": lv}, (16, 16),
                         image_sizes=[(5, 7)] if padded else None)
    if not padded:
        one = DistillContext({"a": s[..., :1, :1]}, {"a": t[..., :1, :1]}, {"a": lv}, (8, 8))
    assert float(method(one)["distill"].detach()) == 0.0


# --------------------------------------------------------------------------- summability


@pytest.mark.parametrize("name", ALL)
def test_terms_sum_to_total(name) -> None:
    ctx, levels = small_context(requires_grad=True)
    method = randomise(build_method(name, levels, weight=1.7).double())
    out = method(ctx)
    assert out and all(isinstance(v, Tensor) and v.ndim == 0 for v in out.values())
    assert all(k == "distill" or k.startswith("distill/") for k in out)
    total = sum(out.values())
    assert set(method.level_values) == {lv.name for lv in levels}
    assert all(not v.requires_grad and v.ndim == 0 for v in method.level_values.values())
    assert float(total.detach()) == pytest.approx(1.7 * float(sum(method.level_values.values())),
                                         rel=1e-6)
    total.backward()  # the terms stay in the graph


# --------------------------------------------------------------------------- registry


LV = [Level("p3", 8, 4, 4), Level("p4", 16, 4, 4)]


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"method='nope' is unknown; expected one of") as err:
        build_method("nope", LV)
    for name in ("imitation", "pkd", "cwd", "mgd", "fgd", "ssim", "l1", "mse"):
        assert f"'{name}'" in str(err.value)


@pytest.mark.parametrize(("name", "valid"), [
    ("cwd", "['adapter', 'tau', 'weight']"),
    ("pkd", "['adapter', 'preset', 'weight']"),
    ("mgd", "['adapter', 'mask_ratio', 'preset', 'weight']"),
    ("fgd", "['adapter', 'alpha', 'beta', 'gamma', 'lambda_', 'preset', 'temperature', "
            "'weight']"),
])
def test_unknown_option_lists_valid_ones(name, valid) -> None:
    with pytest.raises(ValueError, match=r"option\(s\) \['temp'\] are not accepted by method "
                       rf"'{name}'; expected some of") as err:
        build_method(name, LV, temp=0.5)
    assert valid in str(err.value)


def test_unknown_imitation_option_lists_distance_options() -> None:
    with pytest.raises(ValueError, match=r"option\(s\) \['tau'\] are not accepted by "
                       r"(method|distance) 'ssim'; expected some of \[.*'window_size'"):
        build_method("ssim", LV, tau=1.0)
    with pytest.raises(ValueError, match=r"distance='foo' is not supported"):
        build_method("imitation", LV, distance="foo")
    with pytest.raises(ValueError, match=r"method 'ssim' fixes .*contradict"):
        build_method("ssim", LV, distance="l1")


NAN, INF = float("nan"), float("inf")
BAD = [
    ("pkd", {"weight": -1.0}, r"weight=-1\.0 is invalid"),
    ("cwd", {"weight": -2}, r"weight=-2 is invalid"),
    ("ssim", {"weight": -0.5}, r"weight=-0\.5 is invalid"),
    ("fgd", {"weight": INF}, r"weight=inf is invalid"),
    ("pkd", {"weight": True}, r"weight=True is invalid"),
    ("cwd", {"tau": 0}, r"tau=0 is invalid; expected a finite number > 0"),
    ("cwd", {"tau": NAN}, r"tau=nan is invalid"),
    ("cwd", {"weight": NAN}, r"weight=nan is invalid"),
    ("mgd", {"mask_ratio": 1}, r"mask_ratio=1(\.0)? is invalid; expected \[0, 1\)"),
    ("mgd", {"mask_ratio": 1.5}, r"mask_ratio=1\.5 is invalid"),
    ("mgd", {"mask_ratio": -0.1}, r"mask_ratio=-0\.1 is invalid"),
    ("mgd", {"mask_ratio": NAN}, r"mask_ratio=nan is invalid"),
    ("mgd", {"weight": NAN}, r"weight=nan is invalid"),
    ("fgd", {"temperature": 0}, r"temperature=0 is invalid"),
    ("fgd", {"alpha": -1e-3}, r"alpha=-0\.001 is invalid"),
    ("fgd", {"beta": NAN}, r"beta=nan is invalid"),
    ("fgd", {"gamma": -1}, r"gamma=-1 is invalid"),
    ("fgd", {"lambda_": NAN}, r"lambda_=nan is invalid"),
    ("pkd", {"preset": "yolo"},
     r"preset='yolo' is not supported; expected one of \['retinanet', 'fasterrcnn'\]"),
    ("mgd", {"preset": "fcos"}, r"preset='fcos' is not supported"),
    ("fgd", {"preset": "ssd"},
     r"preset='ssd' is not supported; expected one of \['retinanet', 'fasterrcnn', 'fcos'\]"),
    *[(m, {"adapter": "foo"}, r"adapter='foo' is not supported") for m in ALL],
]


@pytest.mark.parametrize(("name", "options", "message"), BAD,
                         ids=[f"{n}-{next(iter(o))}={next(iter(o.values()))}"
                              for n, o, _ in BAD])
def test_bad_option_values(name, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_method(name, LV, **options)


def test_bad_levels_and_context() -> None:
    with pytest.raises(ValueError, match="levels is empty"):
        build_method("cwd", [])
    with pytest.raises(ValueError, match="not unique"):
        build_method("cwd", [LV[0], LV[0]])
    with pytest.raises(ValueError, match="equal channels"):
        build_method("cwd", [Level("a", 8, 3, 4)], adapter="identity")
    ctx, levels = small_context()
    ctx.boxes = None
    with pytest.raises(ValueError, match="needs ground-truth boxes"):
        build_method("fgd", levels)(ctx)
    with pytest.raises(ValueError, match=r"levels \['z'\] are missing"):
        build_method("cwd", [*levels, Level("z", 64, 3, 4)])(ctx)


# Authors' values: MMRazor configs/distill/mmdet/pkd (loss_weight 10 RetinaNet, 6 Faster R-CNN),
# MMRazor configs/distill/mmdet/cwd (tau 1, loss_weight 10), yzd-v/MGD det/configs/distillers/mgd
# (alpha_mgd 2e-5 / lambda_mgd 0.65 RetinaNet, 5e-7 / 0.45 Faster R-CNN), yzd-v/FGD
# configs/distillers/fgd (temp, alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd).
PRESETS = [
    ("pkd", {}, {"weight": 10.0}),
    ("pkd", {"preset": "retinanet"}, {"weight": 10.0}),
    ("pkd", {"preset": "fasterrcnn"}, {"weight": 6.0}),
    ("pkd", {"preset": "fasterrcnn", "weight": 2.0}, {"weight": 2.0}),
    ("cwd", {}, {"weight": 10.0, "tau": 1.0}),
    ("mgd", {}, {"weight": 2e-5, "mask_ratio": 0.65}),
    ("mgd", {"preset": "fasterrcnn"}, {"weight": 5e-7, "mask_ratio": 0.45}),
    ("mgd", {"preset": "fasterrcnn", "mask_ratio": 0.3}, {"weight": 5e-7, "mask_ratio": 0.3}),
    ("fgd", {}, {"temperature": 0.5, "term_weights": {"fg": 1e-3, "bg": 5e-4,
                                                      "attention": 5e-4, "global": 5e-6}}),
    ("fgd", {"preset": "fasterrcnn"}, {"temperature": 0.5, "term_weights": {
        "fg": 5e-5, "bg": 2.5e-5, "attention": 5e-5, "global": 5e-7}}),
    ("fgd", {"preset": "fcos"}, {"temperature": 0.8, "term_weights": {
        "fg": 1.6e-3, "bg": 8e-4, "attention": 8e-4, "global": 8e-6}}),
    ("fgd", {"preset": "fcos", "gamma": 0.0, "weight": 2.0}, {"temperature": 0.8, "weight": 2.0,
     "term_weights": {"fg": 1.6e-3, "bg": 8e-4, "attention": 0.0, "global": 8e-6}}),
]


@pytest.mark.parametrize(("name", "options", "expected"), PRESETS)
def test_presets_are_the_authors_values(name, options, expected) -> None:
    method = build_method(name, LV, **options)
    for attr, value in expected.items():
        assert getattr(method, attr) == value, attr
    if name == "fgd":
        assert method.weight == expected.get("weight", 1.0)


def test_method_info_lists_options_and_aliases() -> None:
    names = [info.name for info in describe_methods()]
    assert names[:5] == ["imitation", "cwd", "fgd", "mgd", "pkd"]
    info = method_info("ssim")
    assert info.name == "imitation" and set(info.aliases) >= {"ssim", "l1", "mse", "l2"}
    assert "window_size" in info.extra_options["ssim"]
    fgd = method_info("fgd")
    assert fgd.needs_boxes and fgd.options["preset"] == "retinanet"
    assert method_info("mgd").options == {"preset": "retinanet", "weight": None,
                                          "mask_ratio": None, "adapter": "auto"}


def test_user_registered_method() -> None:
    """A method registered by a user: built by name and alias, listed; cleanup unregisters it."""
    try:
        @register_method("toy_kd", aliases={"toy_kd_x2": {"scale": 2.0}})
        class ToyKD(DistillMethod):
            """Toy: scaled mean squared difference of the raw features."""

            paper = "nobody, 2026"

            def __init__(self, levels, *, scale: float = 1.0, weight: float = 1.0) -> None:
                super().__init__(levels, weight=weight)
                self.scale = check_positive("scale", scale)

            def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
                self.check_context(ctx)
                total = 0.0
                for name in self.levels:
                    v = ctx.mean_over_images(
                        name, lambda s, t, g: self.scale * (s - t).pow(2).mean())
                    self.level_values[name] = v.detach()
                    total = total + v
                return {"distill": self.weight * total}

        m = build_method("toy_kd", LV, weight=3.0)
        assert isinstance(m, ToyKD) and m.weight == 3.0 and m.scale == 1.0
        assert build_method("toy_kd_x2", LV).scale == 2.0
        info = {i.name: i for i in describe_methods()}["toy_kd"]
        assert info.options == {"scale": 1.0, "weight": 1.0}
        assert info.aliases == {"toy_kd_x2": {"scale": 2.0}}
        assert info.summary.startswith("Toy:") and info.paper == "nobody, 2026"
        with pytest.raises(ValueError, match=r"option\(s\) \['tau'\] are not accepted"):
            build_method("toy_kd", LV, tau=1)
        with pytest.raises(ValueError, match=r"scale=-1 is invalid"):
            build_method("toy_kd", LV, scale=-1)
        with pytest.raises(ValueError, match="already registered"):
            register_method("toy_kd")(ToyKD)
        with pytest.raises(ValueError, match="already registered"):
            register_method("pkd")(ToyKD)
        with pytest.raises(TypeError, match="not a DistillMethod"):
            register_method("toy_bad")(dict)
        ctx, levels = small_context(cs=4, ct=4)
        out = build_method("toy_kd", levels)(ctx)
        assert float(out["distill"]) > 0
    finally:
        METHODS.pop("toy_kd", None)
        ALIASES.pop("toy_kd_x2", None)
    assert "toy_kd" not in METHODS and "toy_kd_x2" not in ALIASES
    assert "toy_kd" not in [i.name for i in describe_methods()]
    with pytest.raises(ValueError, match="unknown"):
        build_method("toy_kd", LV)


# --------------------------------------------------------------------------- review findings
@pytest.mark.parametrize("ratio", [0.3, 0.65])
def test_mgd_masks_the_given_share_of_positions(ratio: float) -> None:
    """Not monkeypatched: the real mask zeroes ``mask_ratio`` of the positions, the same ones
    in every channel, and the generator sees exactly that masked map."""
    torch.manual_seed(0)
    mask = mgd_mod.random_keep_mask(torch.ones(4, 3, 100, 100), ratio)
    assert mask.shape == (4, 1, 100, 100)
    assert abs(1 - float(mask.mean()) - ratio) < 0.01  # 40000 positions
    level = Level("s8", 8, 3, 3)
    method = build_method("mgd", [level], mask_ratio=ratio)
    seen = []
    method.generators["s8"].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    s = {"s8": torch.rand(2, 3, 100, 100) + 0.5}  # no zero of its own
    method(DistillContext(s, {"s8": torch.rand(2, 3, 100, 100)}, {"s8": level}, (800, 800)))
    zero = seen[0] == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # one mask for all channels
    assert abs(float(zero.float().mean()) - ratio) < 0.01


def test_pkd_counts_valid_cells_in_float32_under_bf16() -> None:
    """Padded bf16 features: the valid-cell count (here 1425, which bf16 cannot
    hold exactly) is taken in float32, so the loss is that of the float32 features."""
    level = Level("s8", 8, 4, 4)
    gen = torch.Generator().manual_seed(0)
    s32 = torch.randn(2, 4, 30, 30, generator=gen)
    t32 = torch.randn(2, 4, 30, 30, generator=gen)
    sizes = [(240, 240), (200, 168)]  # valid cells 30x30 and 25x21
    method = build_method("pkd", [level])
    ctx = DistillContext({"s8": s32.bfloat16()}, {"s8": t32.bfloat16()}, {"s8": level},
                         (240, 240), image_sizes=sizes)
    assert ctx.valid_mask("s8").dtype == torch.float32
    assert float(ctx.valid_mask("s8").sum()) == 900 + 525
    got = method(ctx)["distill"]
    ref_ctx = DistillContext({"s8": s32.bfloat16().float()}, {"s8": t32.bfloat16().float()},
                             {"s8": level}, (240, 240), image_sizes=sizes)
    assert got.dtype == torch.float32
    assert torch.equal(got, method(ref_ctx)["distill"])


def test_fgd_masks_rows_follow_y_and_columns_x() -> None:
    """A wide, short box (x 0..5, y 1..2 in cells) covers rows 1-2 and columns 0-5."""
    fg, _ = box_masks([torch.tensor([[0.0, 1.0, 5.0, 2.0]])], 8, 8, device=torch.device("cpu"),
                      dtype=torch.float32)
    covered = (fg[0] > 0).nonzero().tolist()
    assert {r for r, _ in covered} == {1, 2} and {c for _, c in covered} == set(range(6))
