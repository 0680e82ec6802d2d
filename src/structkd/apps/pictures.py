"""A grid of detections: ground truth beside each model's boxes, on the same images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from ..data import GT_COLOUR, PRED_COLOUR, CocoDetection, draw_boxes


def _draw(ax, image: torch.Tensor, boxes, labels, names: Sequence[str], colour: str,
          scores=None) -> None:
    texts = [names[label] if label < len(names) else str(label) for label in labels]
    if scores is not None:
        texts = [f"{text} {score:.2f}" for text, score in zip(texts, scores, strict=True)]
    ax.imshow(draw_boxes(image, boxes, texts, colour), interpolation="nearest")
    ax.set_axis_off()


@torch.inference_mode()
def detection_grid(models: Mapping[str, nn.Module], dataset: CocoDetection,
                   indices: Sequence[int], out_png: str | Path, *,
                   score_threshold: float = 0.2) -> Path:
    """One row per image: the ground truth, then each model's k highest-scoring detections
    (k = the image's number of objects; at least ``score_threshold``), so panels compare the
    models' best guesses instead of drowning in low-score boxes."""
    cols = 1 + len(models)
    fig = Figure(figsize=(2.8 * cols, 2.8 * len(indices)), dpi=150)
    FigureCanvasAgg(fig)
    names = dataset.class_names
    for r, idx in enumerate(indices):
        image, target = dataset[idx]
        ax = fig.add_subplot(len(indices), cols, r * cols + 1)
        _draw(ax, image, target["boxes"].tolist(), target["labels"].tolist(), names, GT_COLOUR)
        if r == 0:
            ax.set_title("ground truth", fontsize=8)
        for c, (name, model) in enumerate(models.items()):
            model.eval()
            out = model([image])[0]
            k = max(1, len(target["labels"]))
            order = out["scores"].argsort(descending=True)[:k]
            keep = order[out["scores"][order] >= score_threshold]
            ax = fig.add_subplot(len(indices), cols, r * cols + 2 + c)
            _draw(ax, image, out["boxes"][keep].tolist(), out["labels"][keep].tolist(), names,
                  PRED_COLOUR, out["scores"][keep].tolist())
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle("green: ground truth; red: each model's k highest-scoring detections, "
                 f"k = number of objects (score >= {score_threshold})", fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
