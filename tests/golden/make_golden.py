"""Regenerate ``tests/golden/losses.json``: golden values of the feature-distillation losses.

Run from the repository root (it never imports ``structkd``):

    PYTHONPATH=src .venv/bin/python tests/golden/make_golden.py

Inputs are not stored: each is ``torch.randn``/``torch.rand`` (float32, CPU) from a seeded
``torch.Generator``, optionally mixed with another input (``make_input``). The file records the
seed, shape, sum and first values of every input, so a change of torch's CPU generator shows up as
an input-checksum failure instead of a wrong loss.

Every expected value is computed in float64 from the float32 inputs by an implementation that is
independent of ``structkd``:

* ``numpy``: the reference below (``np_ssim_map``: numpy padding + explicit sliding-window
  correlation; ``np_minmax``: numpy min/max). It implements the paper's SSIM with separate
  luminance / contrast / structure terms (C3 = C2 / 2), the window truncation rule of
  ``structkd.losses.ssim.window_taps`` (re-derived here, see ``taps``), and torch's "reflect"
  padding (numpy "reflect": the edge sample is not repeated).
* ``kornia``: ``kornia.losses.ssim_loss`` / ``kornia.metrics.ssim`` 0.9 (reflect padding, Gaussian
  sigma 1.5, ``eps=0.0`` so that no term is added to the denominator), on the numpy-min-max'd
  inputs; used wherever the window fits the map without truncation and sigma is 1.5.
* ``skimage``: ``skimage.metrics.structural_similarity`` (gaussian_weights, sigma, no sample
  covariance) full map cropped by ``(win_size - 1) // 2``, for ``padding="valid"``.

For the kornia and skimage entries the numpy reference is computed as well and must agree to
1e-10 (asserted here), so every entry has two independent sources where two exist. Each entry's
``reference`` field names the one whose value is stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).with_name("losses.json")
EPS = 1e-6  # structkd's default min-max eps (r = max - min + eps)

# name -> how to build it. dist: randn | rand; "mix": (base, a, b) means a * base + b * this.
INPUTS: dict[str, dict] = {
    "A_t": {"seed": 1, "shape": [2, 3, 12, 13], "dist": "randn"},
    "A_s": {"seed": 2, "shape": [2, 3, 12, 13], "dist": "randn", "mix": ["A_t", 0.8, 0.6]},
    "U_t": {"seed": 3, "shape": [2, 2, 16, 15], "dist": "rand"},
    "U_s": {"seed": 4, "shape": [2, 2, 16, 15], "dist": "rand", "mix": ["U_t", 0.7, 0.3]},
    "P7_t": {"seed": 5, "shape": [2, 4, 7, 11], "dist": "randn"},
    "P7_s": {"seed": 6, "shape": [2, 4, 7, 11], "dist": "randn", "mix": ["P7_t", 0.5, 0.9]},
    "S_t": {"seed": 7, "shape": [1, 3, 3, 4], "dist": "randn"},
    "S_s": {"seed": 8, "shape": [1, 3, 3, 4], "dist": "randn", "mix": ["S_t", 0.6, 0.8]},
    # FeatureDistillLoss: student has 3 channels, teacher 4 (a 1x1 adapter maps 3 -> 4).
    "F0_s": {"seed": 10, "shape": [2, 3, 12, 13], "dist": "randn"},
    "F0_t": {"seed": 11, "shape": [2, 4, 12, 13], "dist": "randn"},
    "F1_s": {"seed": 12, "shape": [2, 3, 6, 7], "dist": "randn"},
    "F1_t": {"seed": 13, "shape": [2, 4, 6, 7], "dist": "randn"},
    "F2_s": {"seed": 14, "shape": [2, 3, 3, 4], "dist": "randn"},
    "F2_t": {"seed": 15, "shape": [2, 4, 3, 4], "dist": "randn"},
    "ADAPT_w": {"seed": 16, "shape": [4, 3, 1, 1], "dist": "randn"},
    "ADAPT_b": {"seed": 17, "shape": [4], "dist": "randn"},
}


def make_input(name: str, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The float32 CPU tensor called ``name`` in ``INPUTS`` (shared with the tests)."""
    cache = {} if cache is None else cache
    if name not in cache:
        spec = INPUTS[name]
        gen = torch.Generator().manual_seed(spec["seed"])
        draw = torch.randn if spec["dist"] == "randn" else torch.rand
        t = draw(spec["shape"], generator=gen, dtype=torch.float32)
        if "mix" in spec:
            base, a, b = spec["mix"]
            t = a * make_input(base, cache) + b * t
        cache[name] = t
    return cache[name]


# ----------------------------------------------------------------------------- numpy reference


def taps(dim: int, window: int, padding: str) -> int:
    """Window truncation: "same" (reflect) allows 2*dim-1 taps, "valid" the largest odd <= dim."""
    if padding == "same":
        return min(window, 2 * dim - 1)
    return min(window, dim if dim % 2 == 1 else dim - 1)


def gauss(n: int, sigma: float) -> np.ndarray:
    c = np.arange(n, dtype=np.float64) - n // 2
    g = np.exp(-(c**2) / (2 * sigma**2))
    return g / g.sum()


def np_blur(x: np.ndarray, window: int, sigma: float, padding: str) -> np.ndarray:
    """Gaussian-weighted local mean over the last two axes (truncated, renormalised window)."""
    h, w = x.shape[-2:]
    kh, kw = taps(h, window, padding), taps(w, window, padding)
    if padding == "same":
        pad = [(0, 0)] * (x.ndim - 2) + [(kh // 2, kh // 2), (kw // 2, kw // 2)]
        x = np.pad(x, pad, mode="reflect")
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(-2, -1))
    return np.einsum("...kl,k,l->...", win, gauss(kh, sigma), gauss(kw, sigma))


def np_components(x, y, *, window=11, sigma=1.5, k1=0.01, k2=0.03, data_range=1.0,
                  padding="same"):
    """Luminance, contrast, structure maps (float64), each computed from its own definition."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    c3 = c2 / 2
    mx, my = np_blur(x, window, sigma, padding), np_blur(y, window, sigma, padding)
    vx = np_blur(x * x, window, sigma, padding) - mx**2
    vy = np_blur(y * y, window, sigma, padding) - my**2
    cov = np_blur(x * y, window, sigma, padding) - mx * my
    sx, sy = np.sqrt(np.maximum(vx, 0)), np.sqrt(np.maximum(vy, 0))
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    con = (2 * sx * sy + c2) / (vx + vy + c2)
    st = (cov + c3) / (sx * sy + c3)
    return lum, con, st


def np_ssim_map(x, y, *, components=(1.0, 1.0, 1.0), **kw) -> np.ndarray:
    """l**a * c**b * sign(s) |s|**g (the structure term keeps its sign)."""
    a, b, g = components
    lum, con, st = np_components(x, y, **kw)
    out = lum**a * con**b
    return out * np.sign(st) * np.abs(st) ** g if g else out


def np_minmax(x, mode: str | None, eps: float = EPS) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if mode is None:
        return x
    axes = (2, 3) if mode == "minmax_channel" else (1, 2, 3)
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    return (x - lo) / (hi - lo + eps)


def np_ssim_distance(x, y, *, normalize="minmax", **kw) -> float:
    return float(np.mean((1 - np_ssim_map(np_minmax(x, normalize), np_minmax(y, normalize),
                                          **kw)) / 2))


# ----------------------------------------------------------------------------- library references


def kornia_distance(x, y, *, normalize, window=11, padding="same") -> float:
    import kornia

    zx = torch.from_numpy(np_minmax(x, normalize))
    zy = torch.from_numpy(np_minmax(y, normalize))
    return float(kornia.losses.ssim_loss(zx, zy, window, eps=0.0, padding=padding))


def kornia_map_mean(x, y, *, window=11) -> float:
    import kornia

    zx, zy = (torch.from_numpy(np.asarray(t, np.float64)) for t in (x, y))
    return float(kornia.metrics.ssim(zx, zy, window, eps=0.0).mean())


def skimage_valid_map(x, y, *, sigma=1.5, data_range=1.0) -> np.ndarray:
    """skimage's full map on each (b, c) slice, cropped to the valid region."""
    from skimage.metrics import structural_similarity

    win = 2 * int(3.5 * sigma + 0.5) + 1  # skimage's window with gaussian_weights (truncate 3.5)
    p = (win - 1) // 2
    out = []
    for xb, yb in zip(np.asarray(x, np.float64), np.asarray(y, np.float64), strict=True):
        maps = [
            structural_similarity(xc, yc, gaussian_weights=True, sigma=sigma,
                                  use_sample_covariance=False, data_range=data_range,
                                  full=True)[1][p:-p, p:-p]
            for xc, yc in zip(xb, yb, strict=True)
        ]
        out.append(np.stack(maps))
    return np.stack(out)


def skimage_distance(x, y, *, normalize) -> float:
    m = skimage_valid_map(np_minmax(x, normalize), np_minmax(y, normalize))
    return float(np.mean((1 - m) / 2))


# ----------------------------------------------------------------------------- golden entries


def _agree(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= 1e-10 * max(1.0, abs(b)), f"{what}: numpy {a!r} vs library {b!r}"


def ssim_entries(inp) -> list[dict]:
    out = []

    def add(eid, s, t, options, reference, lib_value=None):
        opts = dict(options)
        np_kw = {k: v for k, v in opts.items() if k != "normalize"}
        if "window_size" in np_kw:
            np_kw["window"] = np_kw.pop("window_size")
        if "components" in np_kw:
            np_kw["components"] = tuple(np_kw["components"])
        ref = np_ssim_distance(inp(s).numpy(), inp(t).numpy(),
                               normalize=opts.get("normalize", "minmax"), **np_kw)
        if lib_value is not None:
            _agree(ref, lib_value, eid)
            ref = lib_value
        out.append({"id": eid, "student": s, "teacher": t, "options": opts, "expected": ref,
                    "reference": reference})

    a_s, a_t = inp("A_s").numpy(), inp("A_t").numpy()
    for norm in ("minmax", "minmax_channel", None):
        add(f"A_same_{norm}", "A_s", "A_t", {"normalize": norm},
            "kornia.losses.ssim_loss(eps=0) on numpy min-max",
            kornia_distance(a_s, a_t, normalize=norm))
    add("A_valid_minmax", "A_s", "A_t", {"normalize": "minmax", "padding": "valid"},
        "skimage structural_similarity full map, cropped", skimage_distance(a_s, a_t,
                                                                          normalize="minmax"))
    add("A_win7_minmax", "A_s", "A_t", {"normalize": "minmax", "window_size": 7},
        "kornia.losses.ssim_loss(window 7, eps=0) on numpy min-max",
        kornia_distance(a_s, a_t, normalize="minmax", window=7))
    for comps in ((0, 1, 1), (0, 0, 1), (1, 0, 1), (0.5, 1, 2)):
        for pad in ("same", "valid"):
            add(f"A_{pad}_comp{'_'.join(map(str, comps))}", "A_s", "A_t",
                {"normalize": "minmax", "padding": pad, "components": list(comps)},
                "numpy reference (separate l, c, s terms)")
    add("A_sigma1_k_dr2_none", "A_s", "A_t",
        {"normalize": None, "sigma": 1.0, "window_size": 9, "k1": 0.02, "k2": 0.05,
         "data_range": 2.0}, "numpy reference")
    u_s, u_t = inp("U_s").numpy(), inp("U_t").numpy()
    add("U_same_none", "U_s", "U_t", {"normalize": None},
        "kornia.losses.ssim_loss(eps=0)", kornia_distance(u_s, u_t, normalize=None))
    p_s, p_t = inp("P7_s").numpy(), inp("P7_t").numpy()
    add("P7_same_minmax", "P7_s", "P7_t", {"normalize": "minmax"},
        "kornia.losses.ssim_loss(eps=0) on numpy min-max (11 taps fit a 7x11 map)",
        kornia_distance(p_s, p_t, normalize="minmax"))
    add("P7_valid_minmax", "P7_s", "P7_t", {"normalize": "minmax", "padding": "valid"},
        "numpy reference (7 taps in H, 11 in W)")
    for pad in ("same", "valid"):
        for norm in ("minmax", None):
            add(f"S_{pad}_{norm}", "S_s", "S_t", {"normalize": norm, "padding": pad},
                "numpy reference (truncated windows: same 5x7, valid 3x3)")
    return out


def map_mean_entries(inp) -> list[dict]:
    u_s, u_t = inp("U_s").numpy(), inp("U_t").numpy()
    same = kornia_map_mean(u_s, u_t)
    _agree(float(np_ssim_map(u_s, u_t).mean()), same, "map same")
    valid = float(skimage_valid_map(u_s, u_t).mean())
    _agree(float(np_ssim_map(u_s, u_t, padding="valid").mean()), valid, "map valid")
    struct = float(np_ssim_map(u_s, u_t, components=(0, 0, 1)).mean())
    return [
        {"id": "U_same", "student": "U_s", "teacher": "U_t", "options": {}, "expected": same,
         "reference": "kornia.metrics.ssim(eps=0).mean()"},
        {"id": "U_valid", "student": "U_s", "teacher": "U_t", "options": {"padding": "valid"},
         "expected": valid, "reference": "skimage structural_similarity full map, cropped"},
        {"id": "U_same_structure", "student": "U_s", "teacher": "U_t",
         "options": {"components": [0, 0, 1]}, "expected": struct,
         "reference": "numpy reference"},
    ]


def lp_entries(inp, kind: str) -> list[dict]:
    out = []
    for pair in ("A", "P7"):
        x, y = inp(f"{pair}_s").numpy(), inp(f"{pair}_t").numpy()
        for norm in ("minmax", "minmax_channel", None):
            d = np_minmax(x, norm) - np_minmax(y, norm)
            val = float(np.mean(np.abs(d)) if kind == "l1" else np.mean(d**2))
            out.append({"id": f"{pair}_{norm}", "student": f"{pair}_s", "teacher": f"{pair}_t",
                        "options": {"normalize": norm}, "expected": val,
                        "reference": "numpy"})
    return out


def feature_entries(inp) -> list[dict]:
    w = inp("ADAPT_w").numpy().astype(np.float64)[:, :, 0, 0]
    b = inp("ADAPT_b").numpy().astype(np.float64)
    out = []
    for distance, options in (("ssim", {}), ("ssim", {"padding": "valid"}), ("l1", {}),
                              ("mse", {"normalize": "minmax_channel"})):
        total = 0.0
        per_level = {}
        for level in ("F0", "F1", "F2"):
            s = inp(f"{level}_s").numpy().astype(np.float64)
            t = inp(f"{level}_t").numpy()
            adapted = np.einsum("oc,bchw->bohw", w, s) + b[None, :, None, None]
            norm = options.get("normalize", "minmax")
            if distance == "ssim":
                v = np_ssim_distance(adapted, t, normalize=norm,
                                     padding=options.get("padding", "same"))
            else:
                d = np_minmax(adapted, norm) - np_minmax(t, norm)
                v = float(np.mean(np.abs(d)) if distance == "l1" else np.mean(d**2))
            per_level[level] = v
            total += v
        out.append({"id": f"{distance}_{'_'.join(f'{k}-{v}' for k, v in options.items())}",
                    "distance": distance, "options": options, "weight": 2.5,
                    "levels": ["F0", "F1", "F2"], "adapter_weight": "ADAPT_w",
                    "adapter_bias": "ADAPT_b", "per_level": per_level, "expected": 2.5 * total,
                    "reference": "numpy (1x1 conv as einsum, numpy SSIM / L1 / MSE)"})
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
        "_doc": "Generated by tests/golden/make_golden.py (see its docstring); do not edit.",
        "torch_version": torch.__version__,
        "eps": EPS,
        "inputs": inputs,
        "ssim_distance": ssim_entries(inp),
        "ssim_map_mean": map_mean_entries(inp),
        "l1": lp_entries(inp, "l1"),
        "mse": lp_entries(inp, "mse"),
        "feature_distill": feature_entries(inp),
    }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    n = sum(len(v) for v in golden.values() if isinstance(v, list))
    print(f"wrote {n} golden values to {GOLDEN}")


if __name__ == "__main__":
    main()
