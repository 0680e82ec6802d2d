"""What a run produced (``RunResult``), and reading it back from a finished run's folder.

A run writes ``results.json`` (metrics, export, step time, parameters) and its training curves
to ``metrics.csv`` (Lightning's CSV logger); :meth:`RunResult.load` reads both, so code that
reuses a finished run sees the same object a fresh run returns.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunResult", "read_history"]


@dataclass
class RunResult:
    """A finished run: final COCO metrics, the exported student, timing and the curves.

    ``history`` maps each logged training value (``train/loss``, ``train/distill``, the
    detection terms, ``train/level/<name>``) to its ``(step, value)`` series.
    """

    out_dir: Path
    metrics: dict[str, Any]
    export_prefix: Path | None
    step_time_s: float | None
    params: int
    steps: int = 0
    method: dict[str, Any] | None = None
    wall_s: float | None = None  # the whole run: set-up, training, validation, export
    # Distillation runs: the weight used, an "auto" weight's calibration, the start-up check
    # and how large the term was over the run (``DistillStart`` / ``DistillWatch``).
    distill: dict[str, Any] | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "train" if self.method is None else "distill"

    def summary(self) -> dict[str, Any]:
        """The content of ``results.json``."""
        return {
            "mode": self.mode, "method": self.method, "metrics": self.metrics,
            "step_time_s": self.step_time_s, "params": self.params, "steps": self.steps,
            "wall_s": self.wall_s, "distill": self.distill,
            "export": str(self.export_prefix) if self.export_prefix else None,
            "out_dir": str(self.out_dir),
        }

    def save(self) -> Path:
        path = self.out_dir / "results.json"
        path.write_text(json.dumps(self.summary(), indent=2))
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> RunResult:
        """The result of the finished run in ``out_dir`` (its ``results.json``)."""
        out_dir = Path(out_dir)
        path = out_dir / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{out_dir} holds no finished run (no results.json)")
        data = json.loads(path.read_text())
        prefix = out_dir / "student"
        export = prefix if prefix.with_name("student.safetensors").is_file() else None
        return cls(out_dir=out_dir, metrics=data["metrics"], export_prefix=export,
                   step_time_s=data.get("step_time_s"), params=data["params"],
                   steps=data.get("steps", 0), method=data.get("method"),
                   wall_s=data.get("wall_s"), distill=data.get("distill"),
                   history=read_history(out_dir / "metrics.csv"))


def read_history(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-key ``(step, value)`` series of the training values in a run's ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.is_file():
        return series
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for k, v in row.items():
                if k and k.startswith("train/") and v not in ("", None):
                    series.setdefault(k, []).append((step, float(v)))
    return series
