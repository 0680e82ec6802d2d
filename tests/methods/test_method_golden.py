"""The distillation methods against the float64 NumPy reference (``tests/golden/methods.json``):
PKD, CWD, MGD and FGD with the golden inputs, adapters and keep masks, and FGD's box masks."""

from __future__ import annotations

import pytest
import torch
from method_helpers import (
    _CACHE,
    F64,
    GOLDEN,
    REF,
    FixedMasks,
    _no_mask,
    case_context,
    golden_method,
    inp,
    keep_masks,
    valid_cells,
)
from torch import Tensor
from torch.testing import assert_close

import structkd.methods.mgd as mgd_mod
from structkd.methods import DistillMethod
from structkd.methods.fgd import box_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


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
