"""Rendering the synthetic "shapes on photos" images and their COCO annotations.

Six shape classes (disc, square, triangle, ring, cross, star) with random aspect ratio, rotation,
colour and texture are composited onto crops of the photographs bundled with scikit-image, with
non-object clutter (lines, arcs, lumpy blobs, scribbles, glyphs) underneath. Colour and texture
are drawn independently of the class, so a detector has to learn shape. Object sizes are
stratified over COCO's small / medium / large box-area ranges. Objects may overlap; an occluded
object keeps its full box, and placements that would hide more than ``MAX_OCCLUSION`` of an
existing object are rejected. Every image has its own random stream derived from
``(seed, split, index)``, so the output is byte-identical for identical parameters: any change
to the code below changes the images (bump ``GENERATOR_VERSION`` then).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm.auto import tqdm

GENERATOR_VERSION = 1
FORMAT_NAME = "structkd-synthetic-coco"
CLASS_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "star")
# Photographs shipped inside scikit-image (no download). `coins`, `clock` and `colorwheel` are
# left out on purpose: they are full of round things that would be unlabelled "discs".
BACKGROUND_SOURCES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "page",
    "text",
)
MAX_OCCLUSION = 0.7  # an object may lose at most this fraction of its pixels to later objects
MAX_CLUTTER = 9  # 2 to this many non-object distractors per image
SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO's area-range thresholds
SIZE_PROBS = (0.4, 0.35, 0.25)  # small, medium, large (sqrt-area drawn uniformly per range)
_SUPERSAMPLE = 4
_MIN_VISIBLE_PIXELS = 30
_GLYPHS = "abdefhkmnprsuwyzABEFGHKMNPRSW2345689&?#%"  # no O/X/+/T-like glyphs (look like classes)



def _generate(out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Write both splits and ``meta.json`` into ``out``; return the meta dict."""
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)
    ]
    stats: dict[str, Any] = {}
    for split_idx, (split, count) in enumerate(
        (("train", params["num_train"]), ("val", params["num_val"]))
    ):
        image_dir = out / split
        image_dir.mkdir()
        images, annotations = [], []
        dropped = 0
        for i in tqdm(range(count), desc=f"synthetic {split}", unit="img", leave=False,
                      disable=None):  # disable=None: no bar when stderr is not a terminal
            rng = np.random.default_rng([params["seed"], split_idx, i])
            pixels, objects, n_dropped = _render_image(
                rng,
                params["image_size"],
                params["max_objects"],
                max_occlusion=params.get("max_occlusion", MAX_OCCLUSION),
                clutter=params.get("clutter", MAX_CLUTTER),
                size_probs=params.get("size_probs", SIZE_PROBS),
            )
            dropped += n_dropped
            image_id = i + 1
            file_name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(image_dir / file_name, compress_level=4)
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": params["image_size"],
                    "height": params["image_size"],
                }
            )
            for label, (x, y, w, h) in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {
                "description": f"structkd synthetic shapes ({split})",
                "version": str(GENERATOR_VERSION),
                "params": params,
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (out / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
        stats[split] = _split_stats(annotations, dropped)
    meta = {
        "format": FORMAT_NAME,
        "version": GENERATOR_VERSION,
        "params": params,
        "classes": list(CLASS_NAMES),
        "stats": stats,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _split_stats(annotations: list[dict], dropped: int) -> dict[str, Any]:
    per_class = dict.fromkeys(CLASS_NAMES, 0)
    per_area = {"small": 0, "medium": 0, "large": 0}
    for ann in annotations:
        per_class[CLASS_NAMES[ann["category_id"] - 1]] += 1
        a = ann["area"]
        per_area["small" if a < SMALL_AREA else "large" if a > LARGE_AREA else "medium"] += 1
    return {
        "objects": len(annotations),
        "dropped": dropped,
        "per_class": per_class,
        "per_area": per_area,
    }


@functools.lru_cache(maxsize=1)
def _backgrounds() -> tuple[np.ndarray, ...]:
    """The bundled scikit-image photographs as uint8 RGB arrays (loaded once per process)."""
    import skimage.data

    out = []
    for name in BACKGROUND_SOURCES:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception as e:  # skimage raises several types for missing optional data
            raise RuntimeError(
                f"scikit-image background image {name!r} could not be loaded offline ({e}); "
                f"the synthetic dataset needs the images bundled with scikit-image"
            ) from e
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(img[:, :, :3], dtype=np.uint8))
    return tuple(out)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 1]: mostly saturated hues, sometimes grey levels."""
    if rng.random() < 0.15:
        return np.full(3, rng.uniform(0.0, 1.0))
    hue, sat, val = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of a bundled photo, flipped and colour-shifted, as float32 (H, W, 3)."""
    sources = _backgrounds()
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 1.0))
    side = max(min(side, h, w), min(64, h, w))
    y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = Image.fromarray(src[y0 : y0 + side, x0 : x0 + side]).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    bg = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    if rng.random() < 0.25:
        bg = bg[::-1]
    if rng.random() < 0.3:
        bg = bg[:, :, rng.permutation(3)]
    mean = bg.mean()
    contrast = rng.uniform(0.6, 1.2)
    gain = rng.uniform(0.7, 1.3, size=3).astype(np.float32)
    bg = (bg - mean) * contrast + mean
    bg = bg * gain + rng.uniform(-0.12, 0.12)
    return np.clip(bg, 0.0, 1.0).astype(np.float32)


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image, most: int = MAX_CLUTTER) -> None:
    """Draw 2 to ``most`` distractors (lines, arcs, blobs, scribbles, glyphs) in place."""
    if most <= 0:
        return
    size = canvas.size[0]
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(min(2, most), most + 1))):
        colour = tuple(int(c) for c in (_random_colour(rng) * 255).round())
        kind = int(rng.integers(5))
        cx, cy = rng.uniform(0, size, size=2)
        r = rng.uniform(0.03, 0.2) * size
        if kind == 0:  # polyline
            pts = [(float(cx), float(cy))]
            for _ in range(int(rng.integers(1, 4))):
                dx, dy = rng.normal(0, r, size=2)
                pts.append((pts[-1][0] + float(dx), pts[-1][1] + float(dy)))
            draw.line(pts, fill=colour, width=int(rng.integers(1, 6)))
        elif kind == 1:  # open arc (< 250 degrees, never a ring)
            start = float(rng.uniform(0, 360))
            draw.arc(
                [cx - r, cy - r, cx + r, cy + r],
                start,
                start + float(rng.uniform(40, 250)),
                fill=colour,
                width=int(rng.integers(2, 6)),
            )
        elif kind == 2:  # lumpy blob
            t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
            rad = np.ones_like(t)
            for freq in (2, 3, 4):
                rad += rng.uniform(0.1, 0.25) * np.sin(freq * t + rng.uniform(0, 2 * np.pi))
            rad *= r * 0.6
            draw.polygon(
                list(
                    zip(
                        (cx + rad * np.cos(t)).tolist(),
                        (cy + rad * np.sin(t)).tolist(),
                        strict=True,
                    )
                ),
                fill=colour,
            )
        elif kind == 3:  # scribble (random walk)
            steps = rng.normal(0, r * 0.25, size=(int(rng.integers(6, 20)), 2))
            pts = np.cumsum(steps, axis=0) + np.array([cx, cy])
            draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=int(rng.integers(1, 4)))
        else:  # glyphs
            picks = rng.integers(len(_GLYPHS), size=int(rng.integers(1, 6)))
            text = "".join(_GLYPHS[int(i)] for i in picks)
            font = ImageFont.load_default(size=float(rng.uniform(9, 26)))
            draw.text((float(cx), float(cy)), text, fill=colour, font=font)


def _unit_shape(label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon (and optional hole) of class ``label`` (1-based) around the origin."""
    name = CLASS_NAMES[label - 1]
    hole = None
    if name in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], axis=1)
        if name == "ring":
            hole = outer * rng.uniform(0.45, 0.7)
    elif name == "square":
        outer = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    elif name == "triangle":
        t = np.deg2rad([90.0, 210.0, 330.0])
        outer = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif name == "cross":
        a = rng.uniform(0.25, 0.4)  # half arm thickness
        outer = np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ],
            dtype=np.float64,
        )
    else:  # star
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        outer = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
    return outer, hole


def _shape_polygons(
    label: int, rng: np.random.Generator, sqrt_area: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Shape with random aspect ratio and rotation, scaled so its box has area ``sqrt_area**2``."""
    outer, hole = _unit_shape(label, rng)
    aspect = math.exp(rng.uniform(-math.log(1.7), math.log(1.7)))
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    lin = rot @ np.diag([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    outer = outer @ lin.T
    hole = None if hole is None else hole @ lin.T
    extent = outer.max(axis=0) - outer.min(axis=0)
    scale = sqrt_area / math.sqrt(extent[0] * extent[1])
    centre = (outer.max(axis=0) + outer.min(axis=0)) / 2
    outer = (outer - centre) * scale
    hole = None if hole is None else (hole - centre) * scale
    return outer, hole


def _render_alpha(
    outer: np.ndarray, hole: np.ndarray | None, cx: float, cy: float
) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of the polygon placed at (cx, cy): (alpha, x0, y0) of a local patch."""
    centre = np.array([cx, cy])
    lo = np.floor(outer.min(axis=0) + centre).astype(int) - 1
    hi = np.ceil(outer.max(axis=0) + centre).astype(int) + 1
    w, h = (hi - lo).tolist()
    ss = _SUPERSAMPLE
    mask = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(mask)
    offset = centre - lo
    draw.polygon([tuple(p) for p in ((outer + offset) * ss).tolist()], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in ((hole + offset) * ss).tolist()], fill=0)
    alpha = np.asarray(mask.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return alpha, int(lo[0]), int(lo[1])


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray) -> np.ndarray:
    """A (h, w, 3) texture around colour ``base``: solid, stripes, noise, gradient or checker."""
    kind = int(rng.integers(5))
    if kind == 0:
        return np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    other = _random_colour(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 1:  # stripes
        t = ((proj / rng.uniform(3.0, 10.0)) % 1.0 < 0.5)[:, :, None]
    elif kind == 2:  # noise
        sigma = rng.uniform(0.06, 0.2)
        return np.clip(base + rng.normal(0, sigma, size=(h, w, 3)), 0, 1).astype(np.float32)
    elif kind == 3:  # gradient
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1.0))[:, :, None]
    else:  # checker
        cell = rng.uniform(3.0, 8.0)
        t = (((xx // cell) + (yy // cell)) % 2 == 0)[:, :, None]
    return (base * (1 - t) + other * t).astype(np.float32)


def _size_ranges(image_size: int) -> list[tuple[float, float]]:
    """sqrt(box area) ranges of the small / medium / large strata that fit the image."""
    cap = 0.75 * image_size
    ranges = [(10.0, 30.0), (35.0, min(90.0, cap)), (102.0, min(160.0, cap))]
    return [r for r in ranges if r[1] >= r[0]]


def _render_image(
    rng: np.random.Generator,
    size: int,
    max_objects: int,
    *,
    max_occlusion: float = MAX_OCCLUSION,
    clutter: int = MAX_CLUTTER,
    size_probs: tuple[float, ...] | list[float] = SIZE_PROBS,
) -> tuple[np.ndarray, list[tuple[int, list[int]]], int]:
    """Render one image: (uint8 (H, W, 3), [(label, [x, y, w, h])], number of dropped objects)."""
    canvas = Image.fromarray((_background(rng, size) * 255).round().astype(np.uint8))
    _draw_clutter(rng, canvas, clutter)
    img = np.asarray(canvas, dtype=np.float32) / 255.0
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the visible object per pixel

    ranges = _size_ranges(size)
    probs = np.array(size_probs[: len(ranges)], dtype=np.float64)
    if probs.sum() <= 0:  # only the strata that do not fit this image size were weighted
        raise ValueError(
            f"size_probs={list(size_probs)} weights no size stratum that fits {size} px images "
            f"(strata: {ranges})"
        )
    probs = probs / probs.sum()
    n = int(rng.integers(1, max_objects + 1))
    specs = []
    for _ in range(n):
        lo, hi = ranges[int(rng.choice(len(ranges), p=probs))]
        specs.append((float(rng.uniform(lo, hi)), int(rng.integers(1, len(CLASS_NAMES) + 1))))
    specs.sort(key=lambda s: -s[0])  # large first, so small objects end up on top

    totals: list[int] = []
    visible: list[int] = []
    objects: list[tuple[int, list[int]]] = []
    dropped = 0
    for sqrt_area, label in specs:
        outer, hole = _shape_polygons(label, rng, sqrt_area)
        half = (outer.max(axis=0) - outer.min(axis=0)) / 2
        placed = False
        for _ in range(12):
            slack = 0.3 if sqrt_area > 35 and rng.random() < 0.15 else 0.0  # truncation at border
            cx = rng.uniform(half[0] * (1 - 2 * slack), size - half[0] * (1 - 2 * slack))
            cy = rng.uniform(half[1] * (1 - 2 * slack), size - half[1] * (1 - 2 * slack))
            alpha, x0, y0 = _render_alpha(outer, hole, cx, cy)
            # Clip the local patch to the image.
            ax0, ay0 = max(0, -x0), max(0, -y0)
            ax1 = min(alpha.shape[1], size - x0)
            ay1 = min(alpha.shape[0], size - y0)
            if ax1 <= ax0 or ay1 <= ay0:
                continue
            alpha = alpha[ay0:ay1, ax0:ax1]
            ix0, iy0 = x0 + ax0, y0 + ay0
            ih, iw = alpha.shape
            mask = alpha >= 0.5
            if mask.sum() < _MIN_VISIBLE_PIXELS:
                continue
            region = owner[iy0 : iy0 + ih, ix0 : ix0 + iw]
            if totals:
                lost = np.bincount(region[mask] + 1, minlength=len(totals) + 1)[1:]
                remaining = np.asarray(visible) - lost
                if np.any(remaining < (1 - max_occlusion) * np.asarray(totals)):
                    continue
                visible = remaining.tolist()
            patch = img[iy0 : iy0 + ih, ix0 : ix0 + iw]
            base = _random_colour(rng)
            bg_mean = patch[mask].mean(axis=0)
            for _ in range(5):  # keep the object distinguishable from what lies under it
                if np.abs(base - bg_mean).sum() > 0.45:
                    break
                base = _random_colour(rng)
            tex = _texture(rng, ih, iw, base)
            a = alpha[:, :, None]
            img[iy0 : iy0 + ih, ix0 : ix0 + iw] = patch * (1 - a) + tex * a
            region[mask] = len(totals)
            totals.append(int(mask.sum()))
            visible.append(int(mask.sum()))
            ys, xs = np.nonzero(mask)
            bx0, by0 = ix0 + int(xs.min()), iy0 + int(ys.min())
            bx1, by1 = ix0 + int(xs.max()) + 1, iy0 + int(ys.max()) + 1
            objects.append((label, [bx0, by0, bx1 - bx0, by1 - by0]))
            placed = True
            break
        dropped += not placed

    # Mild global degradations so edges are not perfectly clean.
    if rng.random() < 0.3:
        radius = float(rng.uniform(0.3, 0.8))
        img8 = Image.fromarray((img * 255).round().astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(radius)
        )
        img = np.asarray(img8, dtype=np.float32) / 255.0
    img = img + rng.normal(0, rng.uniform(0.0, 0.03), size=img.shape).astype(np.float32)
    pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return pixels, objects, dropped
