"""Regenerate ``tests/golden/methods.json``: golden values of the distillation methods.

Run from the repository root (it never imports ``structkd``):

    .venv/bin/python tests/golden/make_method_golden.py

Like ``make_golden.py``, inputs are not stored: each is drawn by ``torch.randn``/``torch.rand``
(float32, CPU) from a ``torch.Generator`` seeded by a hash of its name, then scaled, shifted or
mixed with another input (``make_input``). The file records the seed, shape, sum and first values
of every input, so a change of torch's CPU generator shows up as an input-checksum failure.
Trainable parts that the tests load into the modules (1x1 adapters, MGD's generators, FGD's
GcBlocks) and MGD's keep masks are such inputs too.

Every expected value is computed in float64 from the float32 inputs by the NumPy code below,
written from the papers' equations and the conventions of the authors' public code:

* PKD (Cao et al., NeurIPS 2022; MMRazor ``PKDLoss``): each channel standardised over
  (N, H, W) with the unbiased std, ``(x - mean) / (std + 1e-6)``; ``mean((S^ - T^)^2) / 2`` per
  level. With padding, the statistics and the mean pool the valid cells of all images.
* CWD (Shu et al., ICCV 2021; MMRazor ``ChannelWiseDivergence``): per image and channel a softmax
  over the H*W cells at temperature tau; ``tau^2 / (N C) * sum p_T (log p_T - log p_S)``.
* MGD (Yang et al., ECCV 2022; yzd-v/MGD ``FeatureLoss``): ``sum((G(M * S) - T)^2) / N`` with
  ``G`` = conv3x3 (zero padding) - ReLU - conv3x3 and the given keep mask M (1 = kept).
* FGD (Yang et al., CVPR 2022; yzd-v/FGD ``FeatureLoss``): boxes mapped to cells by
  ``floor(x1 / s) .. ceil(x2 / s)`` (rows likewise, both ends included, the area counting the
  cells beyond the map that the extent reaches), each covered cell given the largest
  ``1 / area`` of the boxes over it; background cells ``1 / (number of background cells)``
  (all 0 when there is none); teacher attention ``H W softmax(mean_c |T| / temp)`` and
  ``C softmax(mean_hw |T| / temp)``; focal terms ``sum(M A_s A_c (S - T)^2) / N``; attention
  term ``(sum |A_c^S - A_c^T| + sum |A_s^S - A_s^T|) / N``; global term
  ``sum((GC_s(S) - GC_t(T))^2) / N`` with ``GC(x) = x + W2 relu(LN(W1 ctx + b1)) + b2`` and
  ``ctx = sum_hw x softmax_hw(w_k . x + b_k)`` (LayerNorm eps 1e-5, biased variance).
  Unlike the authors' code, rows are indexed by y and columns by x (their mask indexing swaps
  the two axes).

With padding (the ``padded`` case), every method except PKD is the mean over images of its value
on each image's valid crop alone; PKD's statistics pool the valid cells of all images.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).with_name("methods.json")
PKD_EPS = 1e-6
LN_EPS = 1e-5

# ----------------------------------------------------------------------------- inputs

INPUTS: dict[str, dict] = {}


def _add(name: str, shape: list[int], dist: str = "randn", **extra) -> str:
    """Register an input; the seed is a hash of the name, so adding inputs never moves others."""
    INPUTS[name] = {"seed": zlib.crc32(name.encode()) % 2**31, "shape": list(shape),
                    "dist": dist, **extra}
    return name


def make_input(name: str, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The float32 CPU tensor called ``name`` in ``INPUTS`` (shared with the tests).

    ``dist``: "randn", "rand" or "keep" (1 where a uniform draw is <= 1 - ratio, as MGD's
    mask); then ``offset + scale * x``; ``mix: [base, a, b]`` gives ``a * base + b * x``.
    """
    cache = {} if cache is None else cache
    if name not in cache:
        spec = INPUTS[name]
        gen = torch.Generator().manual_seed(spec["seed"])
        if spec["dist"] == "randn":
            t = torch.randn(spec["shape"], generator=gen, dtype=torch.float32)
        else:
            t = torch.rand(spec["shape"], generator=gen, dtype=torch.float32)
            if spec["dist"] == "keep":
                t = (t <= 1 - spec["ratio"]).to(torch.float32)
        t = spec.get("offset", 0.0) + spec.get("scale", 1.0) * t
        if "mix" in spec:
            base, a, b = spec["mix"]
            t = a * make_input(base, cache) + b * t
        cache[name] = t
    return cache[name]


B = 2
CT = 6  # teacher width everywhere; GcBlock hidden width 3
CS_DIFF = 4  # student width of the "diff" cases (a 1x1 adapter maps 4 -> 6)
MASK_RATIO = 0.65

# name, stride, rows, columns
MULTI_LEVELS = [("p5x7", 4, 5, 7), ("p4x4", 8, 4, 4), ("p2x3", 16, 2, 3), ("p1x1", 32, 1, 1)]
PAD_LEVELS = [("s8", 8, 8, 8), ("s16", 16, 4, 4)]
PAD_BATCH_SHAPE = [64, 64]
PAD_IMAGE_SIZES = [[64, 48], [40, 64]]  # valid cells: s8 8x6 and 5x8; s16 4x3 and 3x4

# Boxes (x1, y1, x2, y2) in pixels. Image 0 of "multi": a large box; a box smaller than one cell
# (at strides 8 and up) inside it (overlap: the smaller area wins); a box touching the top border
# and, at stride 8, the right border (its ceil reaches a column beyond the 4x4 map); a box of
# 1.5 x 1.5 px (smaller than a cell at every stride); a box only inside the 2x3 level's extent
# (touching its right and bottom borders). Image 1 has no boxes.
MULTI_BOXES = [
    [[2.0, 3.0, 26.0, 30.0], [9.5, 10.0, 13.0, 14.5], [20.0, 0.0, 32.0, 12.0],
     [5.25, 17.5, 6.75, 19.0], [36.0, 20.0, 48.0, 32.0]],
    [],
]
# Padded batch: image 0 (64 x 48 px) with a box touching its right and bottom borders (not the
# padded map's) and a small box overlapping a larger one; image 1 (40 x 64 px) with a box over
# the whole image and a small one inside it.
PAD_BOXES = [
    [[4.0, 4.0, 20.0, 28.0], [30.0, 40.0, 48.0, 64.0], [10.0, 10.0, 13.0, 12.0]],
    [[0.0, 0.0, 64.0, 40.0], [50.5, 20.25, 55.0, 23.0]],
]

GC_PARTS = {  # GcBlock parameter -> (shape, scale, offset)
    "context_weight": ([1, CT, 1, 1], 0.5, 0.0),
    "context_bias": ([1], 0.1, 0.0),
    "down_weight": ([CT // 2, CT, 1, 1], 0.5, 0.0),
    "down_bias": ([CT // 2], 0.1, 0.0),
    "norm_weight": ([CT // 2, 1, 1], 0.1, 1.0),
    "norm_bias": ([CT // 2, 1, 1], 0.1, 0.0),
    "up_weight": ([CT, CT // 2, 1, 1], 0.5, 0.0),
    "up_bias": ([CT], 0.1, 0.0),
}


def _level_inputs(prefix: str, name: str, h: int, w: int, *, same_student: bool) -> dict:
    """Register one level's features and trainable parts; returns their input names."""
    t = _add(f"{prefix}_{name}_t", [B, CT, h, w])
    out = {"teacher": t, "student_diff": _add(f"{prefix}_{name}_s{CS_DIFF}", [B, CS_DIFF, h, w]),
           "adapter_weight": _add(f"{prefix}_{name}_aw", [CT, CS_DIFF, 1, 1], scale=0.5),
           "adapter_bias": _add(f"{prefix}_{name}_ab", [CT], scale=0.1),
           "keep": _add(f"{prefix}_{name}_keep", [B, 1, h, w], "keep", ratio=MASK_RATIO),
           "generator": {
               "conv1_weight": _add(f"{prefix}_{name}_g1w", [CT, CT, 3, 3], scale=0.15),
               "conv1_bias": _add(f"{prefix}_{name}_g1b", [CT], scale=0.1),
               "conv2_weight": _add(f"{prefix}_{name}_g2w", [CT, CT, 3, 3], scale=0.15),
               "conv2_bias": _add(f"{prefix}_{name}_g2b", [CT], scale=0.1)},
           "gc_student": {}, "gc_teacher": {}}
    if same_student:
        out["student_same"] = _add(f"{prefix}_{name}_s{CT}", [B, CT, h, w], mix=[t, 0.6, 0.8])
    for side in ("student", "teacher"):
        for part, (shape, scale, offset) in GC_PARTS.items():
            out[f"gc_{side}"][part] = _add(f"{prefix}_{name}_gc{side[0]}_{part}", shape,
                                           scale=scale, offset=offset)
    return out


def _cases() -> dict[str, dict]:
    multi = {name: _level_inputs("M", name, h, w, same_student=True)
             for name, _, h, w in MULTI_LEVELS}
    pad = {name: _level_inputs("P", name, h, w, same_student=False)
           for name, _, h, w in PAD_LEVELS}

    def levels(spec, parts, student_key, cs):
        return [{"name": n, "stride": s, "student_channels": cs, "teacher_channels": CT,
                 "student": parts[n][student_key], **{k: v for k, v in parts[n].items()
                                                      if not k.startswith("student_")}}
                for n, s, _, _ in spec]

    return {
        "multi_same": {"levels": levels(MULTI_LEVELS, multi, "student_same", CT),
                       "batch_shape": [32, 48], "image_sizes": None, "boxes": MULTI_BOXES},
        "multi_diff": {"levels": levels(MULTI_LEVELS, multi, "student_diff", CS_DIFF),
                       "batch_shape": [32, 48], "image_sizes": None, "boxes": MULTI_BOXES},
        "padded": {"levels": levels(PAD_LEVELS, pad, "student_diff", CS_DIFF),
                   "batch_shape": PAD_BATCH_SHAPE, "image_sizes": PAD_IMAGE_SIZES,
                   "boxes": PAD_BOXES},
    }


CASES = _cases()

# ----------------------------------------------------------------------------- numpy reference


def np_conv1x1(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("oc,bchw->bohw", w[:, :, 0, 0], x) + b[None, :, None, None]


def np_conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3x3 cross-correlation with one cell of zero padding."""
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # b c h w 3 3
    return np.einsum("bchwkl,ockl->bohw", win, w) + b[None, :, None, None]


def np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    return np.exp(np_log_softmax(x, axis))


def np_pkd(s_list: list[np.ndarray], t_list: list[np.ndarray]) -> float:
    """PKD of one level, the statistics pooling every cell of every (C, h, w) crop given."""
    def pooled(xs):  # (C, cells)
        return np.concatenate([x.reshape(x.shape[0], -1) for x in xs], axis=1)

    def standardise(x):
        return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, ddof=1, keepdims=True)
                                                       + PKD_EPS)

    s, t = pooled(s_list), pooled(t_list)
    return float(np.mean((standardise(s) - standardise(t)) ** 2) / 2)


def np_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """CWD of one level on (N, C, h, w)."""
    n, c = s.shape[:2]
    ls = np_log_softmax(s.reshape(n, c, -1) / tau, axis=2)
    lt = np_log_softmax(t.reshape(n, c, -1) / tau, axis=2)
    return float((np.exp(lt) * (lt - ls)).sum() * tau**2 / (n * c))


def np_mgd(s: np.ndarray, t: np.ndarray, keep: np.ndarray, g: dict) -> float:
    """MGD of one level on (N, C, h, w) with the keep mask (N, 1, h, w)."""
    x = np_conv3x3(s * keep, g["conv1_weight"], g["conv1_bias"])
    x = np_conv3x3(np.maximum(x, 0), g["conv2_weight"], g["conv2_bias"])
    return float(((x - t) ** 2).sum() / s.shape[0])


def np_box_masks(boxes: list[list[float]], stride: int, h: int, w: int):
    """FGD's foreground and background masks (h, w) of one image."""
    fg = np.zeros((h, w))
    for x1, y1, x2, y2 in boxes:
        c0, c1 = math.floor(x1 / stride), math.ceil(x2 / stride)
        r0, r1 = math.floor(y1 / stride), math.ceil(y2 / stride)
        area = 1.0 / ((r1 + 1 - r0) * (c1 + 1 - c0))
        rs, cs = slice(max(r0, 0), max(r1 + 1, 0)), slice(max(c0, 0), max(c1 + 1, 0))
        fg[rs, cs] = np.maximum(fg[rs, cs], area)
    bg = (fg == 0).astype(np.float64)
    if bg.sum() > 0:
        bg /= bg.sum()
    return fg, bg


def np_attention(x: np.ndarray, temp: float):
    """Spatial (N, h, w) and channel (N, C) attention of (N, C, h, w)."""
    n, c, h, w = x.shape
    v = np.abs(x)
    sp = h * w * np_softmax(v.mean(axis=1).reshape(n, -1) / temp, axis=1)
    ch = c * np_softmax(v.mean(axis=(2, 3)) / temp, axis=1)
    return sp.reshape(n, h, w), ch


def np_gcblock(x: np.ndarray, p: dict) -> np.ndarray:
    n, c = x.shape[:2]
    logits = np.einsum("c,bchw->bhw", p["context_weight"][0, :, 0, 0], x) + p["context_bias"][0]
    weights = np_softmax(logits.reshape(n, -1), axis=1)  # (N, hw)
    context = np.einsum("bcp,bp->bc", x.reshape(n, c, -1), weights)
    y = context @ p["down_weight"][:, :, 0, 0].T + p["down_bias"]  # (N, hidden)
    mu, var = y.mean(axis=1, keepdims=True), y.var(axis=1, keepdims=True)
    y = (y - mu) / np.sqrt(var + LN_EPS) * p["norm_weight"][:, 0, 0] + p["norm_bias"][:, 0, 0]
    z = np.maximum(y, 0) @ p["up_weight"][:, :, 0, 0].T + p["up_bias"]  # (N, C)
    return x + z[:, :, None, None]


def np_fgd(s: np.ndarray, t: np.ndarray, boxes: list, stride: int, temp: float,
           gc_s: dict, gc_t: dict) -> dict[str, float]:
    """FGD's four unweighted terms of one level on (N, C, h, w), averaged over the N images."""
    n, _, h, w = s.shape
    masks = [np_box_masks(b, stride, h, w) for b in boxes]
    fg = np.stack([m[0] for m in masks])[:, None]
    bg = np.stack([m[1] for m in masks])[:, None]
    sa_t, ca_t = np_attention(t, temp)
    sa_s, ca_s = np_attention(s, temp)
    weighted = (s - t) ** 2 * sa_t[:, None] * ca_t[:, :, None, None]
    return {
        "fg": float((weighted * fg).sum() / n),
        "bg": float((weighted * bg).sum() / n),
        "attention": float((np.abs(ca_s - ca_t).sum() + np.abs(sa_s - sa_t).sum()) / n),
        "global": float(((np_gcblock(s, gc_s) - np_gcblock(t, gc_t)) ** 2).sum() / n),
    }


# ----------------------------------------------------------------------------- golden entries

PKD_PRESETS = {"retinanet": 10.0, "fasterrcnn": 6.0}
MGD_PRESETS = {"retinanet": (2e-5, 0.65), "fasterrcnn": (5e-7, 0.45)}
FGD_PRESETS = {
    "retinanet": {"temperature": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4,
                  "lambda_": 5e-6},
    "fasterrcnn": {"temperature": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5,
                   "lambda_": 5e-7},
    "fcos": {"temperature": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4,
             "lambda_": 8e-6},
}
FGD_TERMS = {"fg": "alpha", "bg": "beta", "attention": "gamma", "global": "lambda_"}


def _entry_id(case: str, options: dict) -> str:
    return "_".join([case, *(f"{k}-{v}" for k, v in options.items())] if options
                    else [case, "defaults"])


class Level:
    """One level of a case as float64 arrays: per-image valid crops of S (adapted) and T."""

    def __init__(self, case: dict, spec: dict, inp) -> None:
        def a(name):
            return inp(name).numpy().astype(np.float64)

        self.name, self.stride = spec["name"], spec["stride"]
        s, t = a(spec["student"]), a(spec["teacher"])
        if spec["student_channels"] != spec["teacher_channels"]:
            s = np_conv1x1(s, a(spec["adapter_weight"]), a(spec["adapter_bias"]))
        self.keep = a(spec["keep"])
        self.generator = {k: a(v) for k, v in spec["generator"].items()}
        self.gc = {side: {k: a(v) for k, v in spec[f"gc_{side}"].items()}
                   for side in ("student", "teacher")}
        h, w = t.shape[-2:]
        if case["image_sizes"] is None:
            self.cells = [(h, w)] * t.shape[0]
        else:
            self.cells = [(min(h, math.ceil(ih / self.stride)), min(w, math.ceil(iw / self.stride)))
                          for ih, iw in case["image_sizes"]]
        self.boxes = case["boxes"]
        self.s, self.t = s, t

    def crops(self):
        """(s, t, keep, boxes) of each image alone: arrays of shape (1, C, h, w)."""
        for i, (h, w) in enumerate(self.cells):
            yield (self.s[i:i + 1, :, :h, :w], self.t[i:i + 1, :, :h, :w],
                   self.keep[i:i + 1, :, :h, :w], [self.boxes[i]])

    def per_image_mean(self, fn) -> float | dict:
        values = [fn(*c) for c in self.crops()]
        if isinstance(values[0], dict):
            return {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        return float(np.mean(values))


def _levels(case_name: str, inp) -> list[Level]:
    case = CASES[case_name]
    return [Level(case, spec, inp) for spec in case["levels"]]


def pkd_entries(inp) -> list[dict]:
    out = []
    for case, options in (("multi_same", {"preset": "retinanet"}),
                          ("multi_diff", {"preset": "fasterrcnn"}),
                          ("multi_same", {"weight": 2.5}),
                          ("padded", {"preset": "retinanet"})):
        weight = options.get("weight", PKD_PRESETS[options.get("preset", "retinanet")])
        per_level = {}
        for lv in _levels(case, inp):
            crops = list(lv.crops())
            per_level[lv.name] = np_pkd([c[0][0] for c in crops], [c[1][0] for c in crops])
        out.append({"id": _entry_id(case, options),
                    "case": case, "options": options, "weight": weight,
                    "per_level": per_level,
                    "expected": {"distill": weight * sum(per_level.values())},
                    "reference": "numpy (statistics over the valid cells of all images)"})
    return out


def cwd_entries(inp) -> list[dict]:
    out = []
    for case, options in (("multi_same", {}), ("multi_diff", {"tau": 2.0, "weight": 3.0}),
                          ("multi_same", {"tau": 0.5, "weight": 1.0}), ("padded", {})):
        tau, weight = options.get("tau", 1.0), options.get("weight", 10.0)
        per_level = {lv.name: lv.per_image_mean(lambda s, t, k, b, tau=tau: np_cwd(s, t, tau))
                     for lv in _levels(case, inp)}
        out.append({"id": _entry_id(case, options),
                    "case": case, "options": options, "weight": weight,
                    "per_level": per_level,
                    "expected": {"distill": weight * sum(per_level.values())},
                    "reference": "numpy (mean over images of each image's value)"})
    return out


def mgd_entries(inp) -> list[dict]:
    out = []
    for case, options, masked in (("multi_same", {"preset": "retinanet"}, True),
                                  ("multi_diff", {"weight": 1.0}, True),
                                  ("multi_same", {"weight": 1e-3, "mask_ratio": 0.0}, False),
                                  ("padded", {"weight": 1.0}, True)):
        preset = MGD_PRESETS[options.get("preset", "retinanet")]
        weight = options.get("weight", preset[0])
        per_level = {}
        for lv in _levels(case, inp):
            per_level[lv.name] = lv.per_image_mean(
                lambda s, t, k, b, lv=lv, masked=masked: np_mgd(
                    s, t, k if masked else np.ones_like(k), lv.generator))
        out.append({"id": _entry_id(case, options),
                    "case": case, "options": options, "weight": weight,
                    "keep_mask": "each level's 'keep' input" if masked else None,
                    "per_level": per_level,
                    "expected": {"distill": weight * sum(per_level.values())},
                    "reference": "numpy (conv3x3 as sliding-window einsum)"})
    return out


def fgd_entries(inp) -> list[dict]:
    out = []
    custom = {"temperature": 0.8, "alpha": 2.0, "beta": 3.0, "gamma": 0.5, "lambda_": 0.1,
              "weight": 1.5}
    for case, options in (("multi_same", {"preset": "retinanet"}), ("multi_diff", custom),
                          ("multi_same", {"preset": "fcos"}),
                          ("multi_same", {"preset": "fasterrcnn", "alpha": 0.25}),
                          ("padded", custom)):
        opts = {**FGD_PRESETS[options.get("preset", "retinanet")],
                **{k: v for k, v in options.items() if k != "preset"}}
        weight = opts.pop("weight", 1.0)
        per_level, level_values = {}, {}
        totals = dict.fromkeys(FGD_TERMS, 0.0)
        for lv in _levels(case, inp):
            terms = lv.per_image_mean(lambda s, t, k, b, lv=lv, temp=opts["temperature"]: np_fgd(
                s, t, b, lv.stride, temp, lv.gc["student"], lv.gc["teacher"]))
            per_level[lv.name] = terms
            level_values[lv.name] = sum(opts[FGD_TERMS[k]] * v for k, v in terms.items())
            for k, v in terms.items():
                totals[k] += opts[FGD_TERMS[k]] * v
        out.append({"id": _entry_id(case, options),
                    "case": case, "options": options, "weight": weight, "resolved": opts,
                    "per_level": per_level, "level_values": level_values,
                    "expected": {f"distill/{k}": weight * v for k, v in totals.items()},
                    "reference": "numpy (masks from boxes, attention, GcBlock)"})
    return out


def main() -> None:
    cache: dict[str, torch.Tensor] = {}

    def inp(name: str) -> torch.Tensor:
        return make_input(name, cache)

    inputs = {}
    for name, spec in INPUTS.items():
        t = inp(name)
        inputs[name] = {**spec, "sum": float(t.double().sum()),
                        "first": [float(v) for v in t.flatten()[:4]]}
    golden = {
        "_doc": "Generated by tests/golden/make_method_golden.py (see its docstring); do not "
                "edit. In the padded case the tests fill the padding with garbage: expected "
                "values use each image's valid cells only.",
        "torch_version": torch.__version__,
        "inputs": inputs,
        "cases": CASES,
        "pkd": pkd_entries(inp),
        "cwd": cwd_entries(inp),
        "mgd": mgd_entries(inp),
        "fgd": fgd_entries(inp),
    }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    n = sum(len(v) for v in golden.values() if isinstance(v, list))
    print(f"wrote {n} golden entries ({len(inputs)} inputs) to {GOLDEN}")


if __name__ == "__main__":
    main()
