"""Shared by the loss tests: the numpy reference and golden inputs of ``tests/golden``, seeded
input pairs, and plain-autograd references for the fused SSIM distance."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from structkd.losses import ssim_map

GOLDEN_DIR = Path(__file__).parents[1] / "golden"


def _load_reference():
    name = "structkd_tests_make_golden"  # the name tests/methods/method_helpers.py uses too
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GOLDEN_DIR / "make_golden.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


REF = _load_reference()  # numpy reference + golden input generator
GOLDEN = json.loads((GOLDEN_DIR / "losses.json").read_text())
NORMALIZE = ["minmax", "minmax_channel", None]
PADDINGS = ["same", "valid"]
FUSED = [(1, 1, 1), (0, 1, 1)]
GENERAL = [(0, 0, 1), (1, 0, 1), (0.5, 1, 2)]
F64 = torch.float64


def rand(shape, seed, *, dtype=F64, kind="randn"):
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randn if kind == "randn" else torch.rand
    return draw(shape, generator=gen, dtype=dtype)


def pair(shape, seed, *, dtype=F64, kind="randn", rho=0.7):
    """Correlated (student, teacher) pair; uniform pairs stay in [0, 1]."""
    t = rand(shape, seed, dtype=dtype, kind=kind)
    s = rho * t + (1 - rho) * rand(shape, seed + 1000, dtype=dtype, kind=kind)
    return s, t


def ref_minmax(x, mode, eps=1e-6):
    """Min-max with plain autograd through amin/amax (the reference for the fused gradient)."""
    if mode is None:
        return x
    dims = (2, 3) if mode == "minmax_channel" else (1, 2, 3)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def ref_distance(x, y, normalize="minmax", **kw):
    return ((1 - ssim_map(ref_minmax(x, normalize), ref_minmax(y, normalize), **kw)) / 2).mean()


def grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    value = fn(*inputs)
    return value.detach(), torch.autograd.grad(value, inputs)


def to_np(t):
    return t.detach().double().numpy()


def golden_inputs(*names: str) -> list[torch.Tensor]:
    cache: dict = {}
    return [REF.make_input(n, cache) for n in names]


def golden_options(entry):
    """An entry's options, with ``components`` back as a tuple (JSON stores a list)."""
    opts = dict(entry["options"])
    if "components" in opts:
        opts["components"] = tuple(opts["components"])
    return opts
