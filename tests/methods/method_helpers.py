"""Shared helpers of the method tests (``structkd.methods``): the golden inputs and cases of
``tests/golden/make_method_golden.py`` (``methods.json``), and small random contexts.

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
import sys
from pathlib import Path

import torch
from torch import Tensor

from structkd.methods import (
    DistillContext,
    DistillMethod,
    Level,
    build_method,
)

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
