"""Every method's numerics: gradients (gradcheck), padded batches (each image counts as if it
were alone; garbage in the padding changes nothing), tiny levels, terms that sum to the total,
and the review findings (MGD's mask share, PKD's count under bf16, FGD's rows and columns)."""

from __future__ import annotations

import warnings

import pytest
import torch
from method_helpers import (
    ALL,
    F64,
    GOLDEN,
    IMITATION,
    REF,
    FixedMasks,
    case_context,
    case_levels,
    fixed_mask_for,
    inp,
    keep_masks,
    load_parts,
    randomise,
    rel,
    small_context,
    valid_cells,
)
from torch import Tensor
from torch.autograd import gradcheck

import structkd.methods.mgd as mgd_mod
from structkd.methods import DistillContext, Level, build_method
from structkd.methods.fgd import box_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


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
