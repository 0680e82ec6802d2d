"""A comparison written out: ``results.json``, ``report.md`` (the table and the verdicts) and
``gains.png`` (each seed's paired gain per row, with the mean and its confidence interval)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluation import TABLE_KEYS

if TYPE_CHECKING:
    from .runner import Comparison

__all__ = ["cell", "markdown", "plot_gains", "write_report"]


def cell(mean_std: tuple[float, float] | list[float]) -> str:
    """``mean ± std``, or ``-`` where COCO's metric is undefined (-1: no object of that size)."""
    mean, std = mean_std
    return "-" if mean < 0 else f"{mean:.2f} ± {std:.2f}"


def _weight(d: dict[str, Any], used: list[Any]) -> str:
    w = d.get("weight")
    if d["method"] == "none":
        return "-"
    if w == "auto":
        vals = [v for v in used if isinstance(v, int | float)]
        return "auto" + (f" ({min(vals):.3g}–{max(vals):.3g})" if len(set(vals)) > 1 else
                         f" ({vals[0]:.3g})" if vals else "")
    return "default" if w is None else f"{w:g}"


def markdown(c: Comparison, *, command: str | None = None) -> str:
    """The report: what was compared, the table, the verdict per row."""
    d = c.to_dict()
    pct = f"{100 * c.confidence:.0f}%"
    lines = ["# Does distillation help on this config?", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"{c.seeds} seed(s) per row; per seed every row starts from the same student "
              "weights and sees the same data order; only the distillation differs. "
              + (f"Budget: the first {c.budget['train_images']} of {c.budget['of']} training "
                 f"images ({100 * c.budget['share']:.0f}%), the schedule's epochs unchanged: a "
                 "quick first answer, not the full one." if c.budget else
                 "Full schedule, all training images.")
              + (f" Teacher AP {c.teacher_ap:.2f}." if c.teacher_ap is not None else ""), "",
              "| row | weight | n | " + " | ".join(TABLE_KEYS) + f" | AP gain (paired) | {pct} CI "
              "| gap closed | step ms | verdict |",
              "|---|---:|---:|" + "---:|" * len(TABLE_KEYS) + "---:|---:|---:|---:|---|"]
    for r in d["rows"]:
        g = r["gain"]
        gain = "-" if g is None else f"{g['mean']:+.2f}"
        ci = "-" if g is None or g["low"] is None else f"[{g['low']:+.2f}, {g['high']:+.2f}]"
        gap = "-" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        step = "-" if r["step_time_ms"] is None else f"{r['step_time_ms']:.0f}"
        verdict = "baseline" if g is None else g["verdict"]
        lines.append(f"| {r['name']} | {_weight(r['distill'], r['weights_used'])} | {r['n']} | "
                     + " | ".join(cell(r["metrics"][k]) for k in TABLE_KEYS)
                     + f" | {gain} | {ci} | {gap} | {step} | {verdict} |")
    lines += ["", "Mean ± sample std over seeds. AP gain: the mean over seeds of (row AP − "
              f"no-distillation AP) of the same seed; {pct} CI: Student's t over those paired "
              "differences. Verdict: 'gain' when the whole interval is above 0, 'harm' when it "
              "is below, else 'no evidence of gain'. Gap closed: the mean gain as a share of "
              "the teacher's AP minus the plain student's. Step ms: median training step.", ""]
    lines += [f"- **{r['name']}**: {r['verdict']}" for r in d["rows"] if r["verdict"]]
    lines += ["", "![per-seed gains](gains.png)", ""]
    return "\n".join(lines)


def plot_gains(c: Comparison, path: str | Path) -> Path:
    """Each seed's paired AP gain per row (dots), the mean (bar) and its interval (whisker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in c.to_dict()["rows"] if r["gain"] is not None]
    base = c.runs["none"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6))
    colours = {"gain": "tab:green", "harm": "tab:red"}
    for i, r in enumerate(rows):
        g = r["gain"]
        diffs = [a - b.metrics["AP"] for a, b in zip(r["AP_per_seed"], base, strict=False)]
        colour = colours.get(g["verdict"], "tab:grey")
        ax.bar(i, g["mean"], color=colour, alpha=0.35, width=0.6)
        if g["low"] is not None:
            ax.errorbar(i, g["mean"], yerr=[[g["mean"] - g["low"]], [g["high"] - g["mean"]]],
                        color="black", capsize=4, lw=1)
        ax.scatter([i] * len(diffs), diffs, color=colour, s=18, zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("AP gain over no distillation")
    ax.set_title(f"Paired gain per seed ({c.seeds} seeds; bar: mean, whisker: "
                 f"{100 * c.confidence:.0f}% CI)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(c: Comparison, command: str | None = None) -> dict[str, Path]:
    """``results.json``, ``report.md`` and ``gains.png`` in the comparison's folder."""
    c.out.mkdir(parents=True, exist_ok=True)
    paths = {"results": c.out / "results.json", "report": c.out / "report.md",
             "plot": c.out / "gains.png"}
    paths["results"].write_text(json.dumps(c.to_dict(), indent=2, default=str))
    paths["report"].write_text(markdown(c, command=command))
    plot_gains(c, paths["plot"])
    return paths
