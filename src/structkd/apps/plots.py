"""Figures of the demo: AP per method, training curves, per-level SSIM to the teacher, and a
grid of detections (ground truth, teacher, students)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

if TYPE_CHECKING:
    from ..data import SyntheticPaths
    from ..engine import RunResult

logger = logging.getLogger("structkd.plots")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ap(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars of AP and AP75 per model."""
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["AP"] or 0 for r in rows], 0.4, label="AP")
    ax.bar([x + 0.2 for x in xs], [r["AP75"] or 0 for r in rows], 0.4, label="AP75")
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("COCO box AP (val)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_curves(results: list[RunResult], path: Path) -> Path:
    """Detection loss (total minus distillation terms) and distillation term per step."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in results:
        s = r.history
        if "train/loss" not in s:
            continue
        distill: dict[int, float] = {}
        for key, series in s.items():  # every distillation term (FGD has four)
            if key == "train/distill" or key.startswith("train/distill/"):
                for st, v in series:
                    distill[st] = distill.get(st, 0.0) + v
        det = [(st, v - distill.get(st, 0.0)) for st, v in s["train/loss"]]
        axes[0].plot(*zip(*det, strict=True), label=r.out_dir.name)
        if distill:
            axes[1].plot(*zip(*sorted(distill.items()), strict=True), label=r.out_dir.name)
    axes[0].set_title("detection loss")
    axes[1].set_title("distillation loss (weighted)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def level_ssim(student: torch.nn.Module, teacher: torch.nn.Module, images: list[torch.Tensor],
               ) -> dict[int, float]:
    """SSIM (1 - 2 * distance) per stride between the paired neck levels of two detectors.

    Both see the student's batched input (``Distiller.features``); only levels of equal width
    are compared, without adapters: what the deployed student's features look like.
    """
    from ..distill import Distiller
    from ..losses import ssim_distance

    distiller = Distiller(student, teacher, "ssim")
    try:
        s_feats, t_feats = distiller.features(images)
        out = {}
        for p in distiller.pairs:
            if p.student_channels == p.teacher_channels:
                d = ssim_distance(s_feats[p.name], t_feats[p.name])
                out[p.stride] = float(1 - 2 * d)
        return out
    finally:
        distiller.close()


def plot_level_ssim(values: dict[str, dict[int, float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, per in values.items():
        strides = sorted(per)
        ax.plot(range(len(strides)), [per[s] for s in strides], marker="o", label=name)
        ax.set_xticks(range(len(strides)), [f"P{int(s).bit_length() - 1}" for s in strides])
    ax.set_ylabel("SSIM to teacher features")
    ax.set_title("neck features vs teacher (val images)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_demo(out: Path, rows: list[dict[str, Any]], runs: list[RunResult],
              teacher_prefix: Path, data: SyntheticPaths) -> list[Path]:
    """All demo figures (level SSIM on the first val images of ``data``); returns their paths."""
    from ..data import CocoDetection
    from ..models import load_exported
    from .pictures import detection_grid

    figs = [plot_ap(rows, out / "ap_per_method.png"), plot_curves(runs, out / "curves.png")]
    teacher, _, _ = load_exported(teacher_prefix)
    val = CocoDetection(data.val_ann, data.val_images)
    images = [val[i][0] for i in range(min(8, len(val)))]
    values = {}
    students = {}
    for r in runs:
        assert r.export_prefix is not None
        student, _, _ = load_exported(r.export_prefix)
        students[f"student-{r.out_dir.name}"] = student
        values[r.out_dir.name] = level_ssim(student, teacher, images)
    shown = {"teacher": teacher, **{k: v for k, v in students.items()
                                    if k in ("student-none", "student-ssim")}}
    figs.append(detection_grid(shown, val, list(range(min(4, len(val)))),
                               out / "detections.png"))
    if any(values.values()):
        figs.append(plot_level_ssim(values, out / "level_ssim.png"))
    else:
        logger.info("level SSIM plot skipped: student and teacher neck widths differ")
    (out / "level_ssim.json").write_text(
        json.dumps({k: {str(s): v for s, v in per.items()} for k, per in values.items()},
                   indent=2))
    return figs
