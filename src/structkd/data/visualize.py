"""Boxes drawn onto images (``draw_boxes``) and a grid of dataset samples (``draw_samples``).

``draw_boxes`` draws with ``torchvision.utils.draw_bounding_boxes`` onto the image, enlarged
first when it is small so that the label text stays legible. Figures use matplotlib's
object-oriented API with the Agg canvas directly, so they work headless and do not change the
global pyplot backend of the calling program.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import ImageColor
from torch import Tensor
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from .coco import CocoDetection

GT_COLOUR = "#00e676"
PRED_COLOUR = "#ff1744"
#: ``draw_boxes`` enlarges images whose longer side is shorter than this many pixels.
DRAW_MIN_SIZE = 384


def draw_boxes(
    image: Tensor,
    boxes: Tensor | Sequence[Sequence[float]],
    labels: Sequence[str] | None,
    colours: str | Sequence[str],
    *,
    min_size: int = DRAW_MIN_SIZE,
) -> np.ndarray:
    """Draw XYXY ``boxes`` (in pixels of ``image``) and their ``labels`` onto ``image``.

    ``image`` is (3, H, W), float in [0, 1] (clamped) or uint8. An image whose longer side is
    under ``min_size`` is first enlarged by a whole factor, nearest neighbour (so pixels stay
    sharp), and the boxes with it. Each box is outlined on the pixels just inside it, in its
    colour (``colours``: one for all, or one per box, drawn in order so later boxes lie on top),
    with its label in the top-left corner: black or white text on the box colour. Returns the
    drawing as a uint8 (H', W', 3) array, ready for ``imshow`` or ``PIL.Image.fromarray``.
    """
    img = torch.as_tensor(image).detach().cpu().as_subclass(Tensor)
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"draw_boxes: image of shape {tuple(img.shape)}; expected (3, H, W)")
    if img.is_floating_point():
        img = F.to_dtype(img.clamp(0.0, 1.0), torch.uint8, scale=True)
    h, w = img.shape[-2:]
    scale = max(1, math.ceil(min_size / max(h, w)))
    if scale > 1:
        img = img.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    xyxy = torch.as_tensor(boxes, dtype=torch.float32).detach().cpu().reshape(-1, 4)
    n = len(xyxy)
    if labels is not None and len(labels) != n:
        raise ValueError(f"draw_boxes: {n} boxes but {len(labels)} labels")
    box_colours = [colours] * n if isinstance(colours, str) else list(colours)
    if len(box_colours) != n:
        raise ValueError(f"draw_boxes: {n} boxes but {len(box_colours)} colours")
    if n == 0:
        return img.permute(1, 2, 0).numpy()
    height, width = img.shape[-2:]
    longer = max(height, width)
    font = _font_file()
    img = draw_bounding_boxes(
        img,
        _pixel_boxes(xyxy, scale, width, height),
        labels=list(labels) if labels is not None else None,
        colors=box_colours,
        width=max(2, round(longer / 200)),
        font=font,
        font_size=max(12, round(longer / 30)) if font else None,
        **_label_style(box_colours),
    )
    return img.permute(1, 2, 0).numpy()


def _pixel_boxes(xyxy: Tensor, scale: int, width: int, height: int) -> Tensor:
    """Boxes scaled by ``scale`` as the inclusive pixel ranges they cover on a ``width`` x
    ``height`` canvas: corners ordered, the far edges one pixel in, clamped to the canvas."""
    lo = torch.minimum(xyxy[:, :2], xyxy[:, 2:]) * scale
    hi = torch.maximum(xyxy[:, :2], xyxy[:, 2:]) * scale
    lo, hi = lo.round(), hi.round() - 1
    limit = torch.tensor([width - 1, height - 1], dtype=torch.float32)
    lo = torch.minimum(lo.clamp(min=0), limit)
    hi = torch.maximum(torch.minimum(hi.clamp(min=0), limit), lo)
    return torch.cat([lo, hi], dim=1)


@functools.lru_cache(maxsize=1)
def _font_file() -> str | None:
    """A TrueType font (matplotlib's DejaVu Sans), so the label size can be chosen."""
    try:
        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # pragma: no cover - matplotlib always ships DejaVu Sans
        return None


@functools.lru_cache(maxsize=1)
def _fills_labels() -> bool:
    """Whether this torchvision draws a background behind labels (``fill_labels``, 0.23+)."""
    return "fill_labels" in inspect.signature(draw_bounding_boxes).parameters


def _label_style(colours: Sequence[str]) -> dict:
    """Labels on a background of the box colour, in black or white, whichever reads better."""
    if not _fills_labels():
        return {}  # older torchvision: the text is drawn in the box colour
    text = []
    for colour in colours:
        r, g, b = ImageColor.getrgb(colour)[:3]
        text.append("black" if 0.299 * r + 0.587 * g + 0.114 * b > 128 else "white")
    return {"fill_labels": True, "label_colors": text}


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

    Ground truth is drawn in green (the training boxes: crowd/invalid ones are left out,
    partly-outside ones clipped); ``predictions`` are COCO-format result dicts (``image_id``,
    ``category_id``, ``bbox`` as [x, y, w, h], ``score``) drawn in red, with their score, when
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
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows), dpi=140)
    FigureCanvasAgg(fig)
    for k, idx in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, k + 1)
        image, target = dataset[idx]
        boxes = target["boxes"].tolist()
        labels = [dataset.class_names[label] for label in target["labels"].tolist()]
        colours = [GT_COLOUR] * len(boxes)
        for p in preds_by_image.get(target["image_id"], []):
            x, y, w, h = p["bbox"]
            name = cat_names.get(int(p["category_id"]), f"cat {p['category_id']}")
            boxes.append([x, y, x + w, y + h])
            labels.append(f"{name} {p['score']:.2f}")
            colours.append(PRED_COLOUR)
        ax.imshow(draw_boxes(image, boxes, labels, colours), interpolation="nearest")
        ax.set_title(f"image {target['image_id']} ({len(target['labels'])} boxes)", fontsize=7)
        ax.set_axis_off()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
