"""Render a grid of dataset samples with ground-truth (and optionally predicted) boxes.

Uses matplotlib's object-oriented API with the Agg canvas directly, so it works headless and
does not change the global pyplot backend of the calling program.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .coco import CocoDetection

GT_COLOUR = "#00e676"
PRED_COLOUR = "#ff1744"


def draw_samples(
    ann_file: str | Path,
    image_dir: str | Path,
    out_png: str | Path,
    *,
    num: int = 8,
    seed: int = 0,
    predictions: list[dict] | None = None,
    score_threshold: float = 0.3,
) -> Path:
    """Draw ``num`` randomly chosen images (seeded) with their boxes and class names to a PNG.

    Ground truth is drawn solid in green (the training boxes: crowd/invalid ones are left out,
    partly-outside ones clipped); ``predictions`` are COCO-format result dicts (``image_id``,
    ``category_id``, ``bbox`` as [x, y, w, h], ``score``) drawn dashed in red when
    ``score >= score_threshold``. Returns the written path.
    """
    if num < 1:
        raise ValueError(f"draw_samples: num={num!r}; expected at least 1")
    dataset = CocoDetection(ann_file, image_dir)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(dataset), size=min(num, len(dataset)), replace=False).tolist())

    preds_by_image: dict[int, list[dict]] = {}
    for i, p in enumerate(predictions or []):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in p]
        if missing:
            raise ValueError(f"draw_samples: prediction #{i} is missing key(s) {missing}")
        if p["score"] >= score_threshold:
            preds_by_image.setdefault(int(p["image_id"]), []).append(p)
    cat_names = {c["id"]: c["name"] for c in dataset.categories}

    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for k, idx in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, k + 1)
        image, target = dataset[idx]
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            x1, y1, x2, y2 = box
            ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, edgecolor=GT_COLOUR)
            )
            ax.text(
                x1,
                y1,
                dataset.class_names[label],
                fontsize=6,
                color="black",
                va="bottom",
                bbox={"facecolor": GT_COLOUR, "pad": 0.5, "lw": 0},
            )
        for p in preds_by_image.get(target["image_id"], []):
            x, y, w, h = p["bbox"]
            name = cat_names.get(int(p["category_id"]), f"cat {p['category_id']}")
            ax.add_patch(
                Rectangle((x, y), w, h, fill=False, lw=1.2, ls="--", edgecolor=PRED_COLOUR)
            )
            ax.text(
                x + w,
                y + h,
                f"{name} {p['score']:.2f}",
                fontsize=6,
                color="white",
                ha="right",
                va="top",
                bbox={"facecolor": PRED_COLOUR, "pad": 0.5, "lw": 0},
            )
        ax.set_title(f"image {target['image_id']} ({len(target['labels'])} boxes)", fontsize=7)
        ax.set_axis_off()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
