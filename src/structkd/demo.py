"""``structkd demo`` and ``structkd benchmark``: the built-in study on generated data.

The demo trains (or reuses) a teacher, then students with the same seed and schedule: no
distillation, L2 (MSE) and SSIM; it evaluates all of them and writes ``report.md``,
``results.json`` and plots. The benchmark repeats the students over several seeds, with L1, the
SSIM component ablation and lambda in {1, 2, 4}, and writes ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import Config, load_config
from .data import SyntheticPaths
from .engine import run_config
from .evaluation import TABLE_KEYS

logger = logging.getLogger("structkd.demo")


@dataclass
class Plan:
    """Everything that defines a study: data, teacher and student configs, methods."""

    data: dict[str, Any]
    teacher: dict[str, Any]
    student: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    demo_methods: tuple[str, ...] = ("none", "mse", "ssim")
    notes: list[str] = field(default_factory=list)


_DATA = {"synthetic_train": 512, "synthetic_val": 128, "synthetic_size": 192, "num_workers": 1,
         "batch_size": 4, "val_batch_size": 8}
_OPTIM = {"name": "adamw", "lr": 3e-4, "weight_decay": 0.05, "grad_clip": 10.0}
# RetinaNet ResNet-18, FPN 128, at 128 px (the 192 px images are downscaled by the detector);
# anchors from 16 px because torchvision's 32 px ones miss the small objects at this size.
_MODEL = {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 128, "min_size": 128,
          "max_size": 128, "anchor_size": 16}

METHODS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "l1": {"method": "l1", "weight": 2.0},
    "mse": {"method": "mse", "weight": 2.0},
    "ssim": {"method": "ssim", "weight": 2.0},
    "ssim_s": {"method": "ssim", "weight": 2.0, "options": {"components": [0.0, 0.0, 1.0]}},
    "ssim_cs": {"method": "ssim", "weight": 2.0, "options": {"components": [0.0, 1.0, 1.0]}},
    "ssim_w1": {"method": "ssim", "weight": 1.0},
    "ssim_w4": {"method": "ssim", "weight": 4.0},
    # The L2 term is about 10x smaller than the SSIM term at equal lambda (measured at the start
    # of training here), so L2 also runs with a lambda that matches the SSIM term's size.
    "mse_w20": {"method": "mse", "weight": 20.0},
}

# The teacher is the student's architecture trained 5x longer: on 2 CPU cores a bigger backbone
# cannot be trained to a clear lead within the demo's budget, and what distillation needs is the
# paper's regime, a teacher clearly stronger than the student and a short student schedule.
# With the same neck width the 1x1 adapters start as the identity.
DEFAULT_PLAN = Plan(
    data=_DATA,
    teacher={"model": _MODEL, "optim": _OPTIM,
             "schedule": {"epochs": 10, "milestones": [], "warmup_iters": 100}},
    # The learning rate drops 10x for the last epoch: with a constant rate the AP of so short a
    # run swung by up to 0.9 between seeds (measured), which hid the effect of the method.
    student={"model": _MODEL, "optim": _OPTIM,
             "schedule": {"epochs": 3, "milestones": [2], "warmup_iters": 100}},
    methods=METHODS,
    notes=["Teacher: RetinaNet R-18 FPN-128 at 128 px, 10 epochs of the 512 training images; "
           "students: the same detector, 3 epochs (learning rate x0.1 for the last), one seed. "
           "`structkd benchmark` repeats the students over seeds."],
)

_TINY_MODEL = {**_MODEL, "fpn_channels": 64}
QUICK_PLAN = Plan(
    data={**_DATA, "synthetic_train": 48, "synthetic_val": 16, "synthetic_size": 128,
          "num_workers": 0},
    teacher={"model": _TINY_MODEL, "optim": _OPTIM,
             "schedule": {"epochs": 2, "milestones": [], "warmup_iters": 10}},
    student={"model": _TINY_MODEL, "optim": _OPTIM,
             "schedule": {"epochs": 1, "milestones": [], "warmup_iters": 5}},
    methods=METHODS,
    notes=["--quick: a smoke run on 48 images; its numbers say nothing about the method."],
)


def _plan(quick: bool) -> Plan:
    return QUICK_PLAN if quick else DEFAULT_PLAN


def _section(plan_part: dict[str, Any], data: dict[str, Any], cache: Path, out_dir: Path,
             seed: int, overrides: list[str]) -> Config:
    base = dict(plan_part)
    base["data"] = {**data, "synthetic_root": str(_synthetic(cache).root)}
    base["trainer"] = {"out_dir": str(out_dir), "seed": seed, "val_every": 0,
                       "checkpoint_every": 1}
    return load_config(base=base, overrides=overrides)


def _synthetic(cache: Path) -> SyntheticPaths:
    """Where the plans' generated dataset lives in the cache."""
    return SyntheticPaths.under(cache / "synthetic")


def _key(cfg: Config) -> str:
    d = cfg.to_dict()
    d["trainer"] = {k: v for k, v in d["trainer"].items() if k in ("seed", "precision")}
    text = json.dumps([d, __version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_teacher(plan: Plan, cache: Path, overrides: list[str]) -> tuple[Path, dict[str, Any]]:
    """Train the plan's teacher unless an identical one is cached; returns (prefix, results)."""
    cfg = _section(plan.teacher, plan.data, cache, cache / "teachers", 0, overrides)
    out = cache / "teachers" / _key(cfg)  # the key leaves out_dir out
    cfg.trainer.out_dir = str(out)
    done = out / "results.json"
    if done.is_file() and (out / "student.safetensors").is_file():
        logger.info("teacher: reusing the cached teacher in %s", out)
        return out / "student", json.loads(done.read_text())
    logger.info("teacher: training %s/%s into %s (cached for later runs)",
                cfg.model.arch, cfg.model.backbone, out)
    cfg.distill.method = "none"
    run_config(cfg)
    return out / "student", json.loads(done.read_text())


def run_student(plan: Plan, method: str, teacher: Path, cache: Path, out_dir: Path, seed: int,
                overrides: list[str], *, reuse: bool = False) -> dict[str, Any]:
    """Train one student with ``method``; returns its results.json content.

    ``reuse=True`` returns the results already in ``out_dir`` instead when that run finished
    with exactly this config (how an interrupted study resumes); anything else is retrained.
    """
    part = {**plan.student, "distill": plan.methods[method],
            "teacher": {"checkpoint": str(teacher)}}
    cfg = _section(part, plan.data, cache, out_dir, seed, overrides)
    done = out_dir / "results.json"
    if reuse and done.is_file() and (out_dir / "student.safetensors").is_file():
        try:
            same = load_config(out_dir / "config.yaml").to_dict() == cfg.to_dict()
        except (OSError, ValueError):
            same = False
        if same:
            logger.info("reusing the finished run in %s", out_dir)
            return {**json.loads(done.read_text()), "reused": True}
        logger.info("%s holds a run of another config; training it again", out_dir)
    run_config(cfg)
    return json.loads(done.read_text())


def _latency(prefix: Path, size: int) -> float:
    from .models import load_exported, measure_latency

    model, _, _ = load_exported(prefix)
    return measure_latency(model, size, iters=10)


def _row(name: str, method: str, res: dict[str, Any], prefix: Path, size: int) -> dict[str, Any]:
    m = res["metrics"]
    row = {"name": name, "method": method, **{k: m.get(k) for k in TABLE_KEYS}}
    row["params"] = res["params"]
    row["latency_ms"] = _latency(prefix, size)
    st = res.get("step_time_s")
    row["step_time_ms"] = None if st is None else 1000 * st
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    keys = [*TABLE_KEYS, "params", "latency_ms", "step_time_ms"]
    head = "| model | method | " + " | ".join(keys) + " |"
    lines = [head, "|---|---|" + "---:|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if v is None or (isinstance(v, float) and (math.isnan(v) or v < 0)):
                cells.append("-")
            elif k == "params":
                cells.append(f"{v / 1e6:.1f}M")
            else:
                cells.append(f"{v:.1f}")
        lines.append(f"| {r['name']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(out: str | Path = "structkd_demo", *, quick: bool = False,
             cache: str | Path = "~/.cache/structkd", seed: int = 0,
             overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Teacher (cached) + students none/mse/ssim; prints the table, writes report and plots."""
    t_start = time.perf_counter()
    plan = _plan(quick)
    out, cache = Path(out), Path(cache).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    teacher, t_res = ensure_teacher(plan, cache, overrides)
    size = plan.student["model"]["min_size"]
    rows = [_row("teacher", "-", t_res, teacher, plan.teacher["model"]["min_size"])]
    for method in plan.demo_methods:
        logger.info("student: %s (%d of %d)", method, plan.demo_methods.index(method) + 1,
                    len(plan.demo_methods))
        res = run_student(plan, method, teacher, cache, out / method, seed, overrides)
        rows.append(_row(f"student-{method}", method, res, out / method / "student", size))
    elapsed = time.perf_counter() - t_start
    table = _table(rows)
    print("\n" + table + f"\n\ntotal time {elapsed / 60:.1f} min\n", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    from .plots import plot_demo

    figures = plot_demo(out, rows, [out / m for m in plan.demo_methods], teacher,
                        _synthetic(cache))
    _write_report(out, rows, table, elapsed, plan, quick, figures)
    return rows


def _write_report(out: Path, rows, table: str, elapsed: float, plan: Plan, quick: bool,
                  figures: list[Path]) -> None:
    by = {r["method"]: r for r in rows}
    lines = [
        "# structkd demo", "",
        f"Command: `structkd demo{' --quick' if quick else ''}`; structkd {__version__}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {elapsed / 60:.1f} min.", "",
        table, "",
    ]
    if "ssim" in by and "none" in by and by["none"]["AP"] is not None:
        lines.append(f"SSIM - none: {by['ssim']['AP'] - by['none']['AP']:+.1f} AP; "
                     f"SSIM - L2: {by['ssim']['AP'] - by['mse']['AP']:+.1f} AP (one seed; "
                     "`structkd benchmark` gives the seed study).")
    lines += ["", *plan.notes, ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")


# ---- the seed study ---------------------------------------------------------------------------
def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_benchmark(out: str | Path = "structkd_benchmark", *, seeds: int = 3, quick: bool = False,
                  cache: str | Path = "~/.cache/structkd",
                  results_md: str | Path | None = "benchmarks/RESULTS.md",
                  methods: list[str] | None = None) -> dict[str, Any]:
    """Every method over ``seeds`` seeds against one cached teacher; writes RESULTS.md."""
    t_start = time.perf_counter()
    plan = _plan(quick)
    out, cache = Path(out), Path(cache).expanduser()
    methods = methods or list(plan.methods)
    unknown = [m for m in methods if m not in plan.methods]
    if unknown:
        raise ValueError(f"methods {unknown} are unknown; expected some of {list(plan.methods)}")
    teacher, t_res = ensure_teacher(plan, cache, [])
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in range(seeds):
        for m in methods:
            logger.info("benchmark: seed %d, method %s", seed, m)
            runs[m].append(run_student(plan, m, teacher, cache, out / f"seed{seed}" / m, seed,
                                       [], reuse=True))
    summary = _summarise(runs, t_res, teacher, plan)
    summary["elapsed_min"] = (time.perf_counter() - t_start) / 60
    summary["runs"] = sum(len(rs) for rs in runs.values())
    summary["reused_runs"] = sum(bool(r.get("reused")) for rs in runs.values() for r in rs)
    summary["run_minutes"] = sum(_wall_s(out / f"seed{s}" / m) for s in range(seeds)
                                 for m in methods) / 60
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = _results_markdown(summary, seeds, quick, plan)
    print(text)
    if results_md:
        Path(results_md).parent.mkdir(parents=True, exist_ok=True)
        Path(results_md).write_text(text)
    return summary


def _wall_s(run_dir: Path) -> float:
    """A finished run's wall time: config.yaml is written first and results.json last."""
    return (run_dir / "results.json").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime


def _summarise(runs, t_res, teacher: Path, plan: Plan) -> dict[str, Any]:
    base = [r["metrics"]["AP"] for r in runs.get("none", [])]
    rows = {}
    for m, rs in runs.items():
        stats = {}
        for k in TABLE_KEYS:
            stats[k] = _mean_std([r["metrics"][k] for r in rs])
        aps = [r["metrics"]["AP"] for r in rs]
        diff = [a - b for a, b in zip(aps, base, strict=False)] if base and m != "none" else []
        rows[m] = {"n": len(rs), "metrics": stats, "AP_runs": aps,
                   "diff_vs_none": _mean_std(diff) if diff else None,
                   "step_time_ms": 1000 * statistics.median(
                       [r["step_time_s"] for r in rs if r.get("step_time_s")] or [math.nan])}
    s_size = plan.student["model"]["min_size"]
    any_student = next(iter(runs.values()))[0]
    return {
        "rows": rows,
        "teacher": {"metrics": {k: t_res["metrics"][k] for k in TABLE_KEYS},
                    "params": t_res["params"],
                    "latency_ms": _latency(teacher, plan.teacher["model"]["min_size"])},
        "student": {"params": any_student["params"],
                    "latency_ms": _latency(Path(any_student["export"]), s_size)},
        "plan": {"teacher": plan.teacher, "student": plan.student, "data": plan.data},
    }


def _verdict(rows: dict[str, Any]) -> list[str]:
    """The demo's claim, checked: SSIM above none by more than twice the seed spread, and above
    L2 (the larger of the two sample stds is the spread)."""
    if not {"none", "ssim"} <= set(rows) or rows["ssim"]["diff_vs_none"] is None:
        return []
    ap = {m: r["metrics"]["AP"] for m, r in rows.items()}
    spread = max(ap["none"][1], ap["ssim"][1])
    diff = rows["ssim"]["diff_vs_none"][0]
    out = [f"SSIM - none: {diff:+.2f} AP (paired mean); seed spread {spread:.2f} (larger sample "
           f"std of the two); more than twice the spread: {'yes' if diff > 2 * spread else 'NO'}."]
    for m in ("mse", "mse_w20"):
        if m in ap:
            out.append(f"SSIM - {m}: {ap['ssim'][0] - ap[m][0]:+.2f} AP (means); SSIM above: "
                       f"{'yes' if ap['ssim'][0] > ap[m][0] else 'NO'}.")
    return out


def _results_markdown(s: dict[str, Any], seeds: int, quick: bool, plan: Plan) -> str:
    cmd = "structkd benchmark" + (f" --seeds {seeds}" if seeds != 3 else "") + (
        " --quick" if quick else "")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Seed study on the built-in dataset", "",
        f"Command: `{cmd}` (structkd {__version__}, torch {torch.__version__}); "
        f"{now}; {os.cpu_count()} CPU cores ({cpu}, {platform.system()}), "
        f"threads {torch.get_num_threads()}; {s['elapsed_min']:.0f} min"
        + (f" ({s['reused_runs']} of the {s['runs']} student runs were reused from an "
           "interrupted invocation, so this time covers the rest only)" if s.get("reused_runs")
           else "") + f"; the student runs took {s['run_minutes']:.0f} min in all "
        "(sum of their wall times).", "",
        f"Invoked as: `{shlex.join(sys.argv)}`", "",
        "Teacher: " + json.dumps(plan.teacher["model"]) + "; student: "
        + json.dumps(plan.student["model"]) + "; student schedule: "
        + json.dumps(plan.student["schedule"]) + f"; data: {json.dumps(plan.data)}.", "",
        "| method | n | AP | AP50 | AP75 | APs | APm | APl | AP - none (paired) | step ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in s["rows"].items():
        cells = [f"{r['metrics'][k][0]:.2f} ± {r['metrics'][k][1]:.2f}" for k in TABLE_KEYS]
        d = r["diff_vs_none"]
        dtxt = "-" if d is None else f"{d[0]:+.2f} ± {d[1]:.2f}"
        lines.append(f"| {m} | {r['n']} | " + " | ".join(cells) + f" | {dtxt} | "
                     f"{r['step_time_ms']:.0f} |")
    t = s["teacher"]
    lines += [
        "", "Mean ± sample std over seeds; the paired difference is per seed (same seed, same "
        "data order) against the no-distillation student.", "", *_verdict(s["rows"]), "",
        "| model | AP | params | latency ms/image (CPU) |", "|---|---:|---:|---:|",
        f"| teacher | {t['metrics']['AP']:.1f} | {t['params'] / 1e6:.1f}M | "
        f"{t['latency_ms']:.1f} |",
        f"| student | - | {s['student']['params'] / 1e6:.1f}M | "
        f"{s['student']['latency_ms']:.1f} |", "",
    ]
    return "\n".join(lines)

