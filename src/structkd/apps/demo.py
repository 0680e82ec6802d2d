"""``structkd demo``: a big teacher makes a small, fast student better, on the built-in data.

Generates the data, trains (or reuses) the teacher, then students with the same seed, data order
and schedule: no distillation, L2 (MSE) and SSIM. Evaluates all of them and writes ``report.md``
(the table, the teacher-student size gap, latencies in PyTorch and ONNX Runtime, plots and a grid
of detections), ``results.json`` and the students' ONNX export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from .._version import __version__
from ..console import quieter
from ..engine import RunResult, holds_run, next_free
from ..evaluation import TABLE_KEYS
from ..models import load_exported, torch_runner
from ..timing import interleaved
from .plan import (
    Plan,
    cached_teacher,
    ensure_teacher,
    get_plan,
    run_student,
    student_config,
    synthetic,
    train_steps,
)
from .progress import JobProgress

logger = logging.getLogger("structkd.demo")


def _metrics_row(name: str, method: str, res: RunResult) -> dict[str, Any]:
    st = res.step_time_s
    return {"name": name, "method": method, **{k: res.metrics.get(k) for k in TABLE_KEYS},
            "params": res.params, "step_time_ms": None if st is None else 1000 * st}


LATENCY_THREADS = 1  # one CPU thread: steady medians on a shared machine, a fair comparison


def _latencies(teacher_prefix: Path, student_prefix: Path, size: int, out: Path,
               rounds: int) -> dict[str, float | None]:
    """PyTorch and ONNX Runtime latency of teacher and student (one thread each), with the
    calls of all four interleaved."""
    teacher, _, _ = load_exported(teacher_prefix)
    student, _, _ = load_exported(student_prefix)
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        runners = {"teacher": torch_runner(teacher, size), "student": torch_runner(student, size)}
        try:
            from ..models.onnx import export_run, onnx_runner

            for role, prefix in (("teacher", teacher_prefix), ("student", student_prefix)):
                path = export_run(prefix, out / f"{role}.onnx", image_size=size)
                runners[f"{role}_onnx"] = onnx_runner(path, size, threads=LATENCY_THREADS)
        except Exception as e:  # ONNX is an extra; the PyTorch numbers stand without it
            logger.warning("ONNX Runtime latency skipped: %s: %s", type(e).__name__, e)
        return {n: t.median_ms for n, t in interleaved(runners, rounds=rounds, warmup=3).items()}
    finally:
        torch.set_num_threads(threads)


def _table(rows: list[dict[str, Any]]) -> str:
    keys = [*TABLE_KEYS, "params", "latency_ms", "onnx_ms", "step_time_ms"]
    head = ["AP", "AP50", "AP75", "APs", "APm", "APl", "params", "CPU ms (PyTorch)",
            "CPU ms (ONNX RT)", "train step ms"]
    lines = ["| model | method | " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * len(keys)]
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


DEMO_FILES = ("results.json", "report.md")


def holds_demo(path: Path) -> bool:
    """Whether ``path`` holds (part of) an earlier demo: its results or any of its runs."""
    return path.is_dir() and (any((path / f).exists() for f in DEMO_FILES)
                              or any(holds_run(p) for p in path.iterdir()))


def demo_dir(out: Path, overwrite: bool) -> Path:
    """The demo's folder: an earlier demo is never mixed with or silently replaced by this one."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file; expected a folder")
    if not holds_demo(out):
        return out
    if overwrite:  # the runs replace their folders anyway (see plan.section)
        logger.warning("--overwrite: replacing the demo in %s", out)
        return out
    fresh = next_free(out, holds_demo)
    logger.warning("%s already holds a demo; this one goes to %s (--overwrite replaces it)",
                   out, fresh)
    return fresh


def run_demo(out: str | Path = "structkd_demo", *, quick: bool = False,
             cache: str | Path = "~/.cache/structkd", seed: int = 0,
             overrides: list[str] | None = None, overwrite: bool = False,
             teacher_levels: bool = False) -> list[dict[str, Any]]:
    """Teacher (cached) + students none/mse/ssim; prints the table, writes report and plots.

    A folder that already holds a demo is kept (this one goes to ``<out>-2``, ...) unless
    ``overwrite``. ``teacher_levels``: write the teacher's levels once (``structkd
    cache-teacher``, kept in the cache for later demos) and let the students read them there
    instead of running the teacher every step.
    """
    t_start = time.perf_counter()
    plan = get_plan(quick)
    out, cache = demo_dir(Path(out), overwrite), Path(cache).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    s_steps = train_steps(plan.student, plan.data)
    total = s_steps * len(plan.demo_methods)
    teacher_cached = cached_teacher(plan, cache, overrides) is not None
    if not teacher_cached:
        total += train_steps(plan.teacher, plan.data)
    prog_override = ["trainer.progress=false"]
    logger.info("demo: %s, then %d students (%s); %d training steps in all",
                "teacher from the cache" if teacher_cached else "teacher",
                len(plan.demo_methods), ", ".join(plan.demo_methods), total)
    progress = JobProgress(total, desc="structkd demo")
    # Log lines go above the bar (tqdm.write), never onto it.
    with quieter("lightning", "structkd.data", "structkd.engine"), logging_redirect_tqdm():
        try:
            t_res = ensure_teacher(plan, cache, [*overrides, *prog_override],
                                   callbacks=[progress.begin("teacher")])
            teacher = t_res.export_prefix
            assert teacher is not None
            rows = [_metrics_row("teacher", "-", t_res)]
            runs: list[RunResult] = []
            levels = _teacher_levels(plan, teacher, cache, out, seed, overrides) \
                if teacher_levels else []
            for i, method in enumerate(plan.demo_methods, 1):
                progress.begin(f"student {i}/{len(plan.demo_methods)}: {method}")
                res = run_student(plan, plan.methods[method], teacher, cache, out / method,
                                     seed, [*overrides, *prog_override, *levels],
                                     callbacks=[progress])
                rows.append(_metrics_row(f"student-{method}", method, res))
                runs.append(res)
        finally:
            progress.close()
    size = plan.student["model"]["min_size"]
    assert runs[0].export_prefix is not None
    lat = _latencies(teacher, runs[0].export_prefix, size, out, rounds=5 if quick else 30)
    for r in rows:
        role = "teacher" if r["name"] == "teacher" else "student"
        r["latency_ms"], r["onnx_ms"] = lat.get(role), lat.get(f"{role}_onnx")
    elapsed = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    from .plots import plot_demo

    with quieter("structkd.data"):
        figures = plot_demo(out, rows, runs, teacher, synthetic(cache))
    table = _table(rows)
    gap = _gap_lines(rows)
    report = _write_report(out, rows, table, gap, elapsed, plan, quick, figures, teacher_cached)
    print("\n" + table + "\n\n" + "\n".join(gap) + f"\n\ntotal time {elapsed / 60:.1f} min"
          + ("" if not teacher_cached else " (teacher from the cache)") + "\n", flush=True)
    print(f"report: {report}")
    for f in figures:
        print(f"figure: {f}")
    return rows


def _teacher_levels(plan: Plan, teacher: Path, cache: Path, out: Path, seed: int,
                    overrides: list[str]) -> list[str]:
    """Write (or reuse) the cache of the teacher's levels for the students' setting; the
    overrides that make the students read it."""
    from ..recipes import cache_teacher

    cfg = student_config(plan, {"method": "ssim"}, teacher, cache, out / "_levels", seed,
                         overrides)
    dtype = cfg.teacher.cache_dtype  # one folder per storage precision (float16: as before)
    where = cache / "teacher_levels" / (teacher.parent.name + (
        "" if dtype == "float16" else f"-{dtype}"))
    logger.info("demo: the students read the teacher's levels from %s (written once, for all "
                "students: flips are replayed)", where)
    with quieter("structkd.data"):
        written = cache_teacher(cfg, where, progress=False)
    return ["teacher.checkpoint=null", f"teacher.cache={written.root}"]


def _gap_lines(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["name"]: r for r in rows}
    t, none = by.get("teacher"), by.get("student-none")
    lines = []
    if t and none:
        lines.append(
            f"Size gap: student {none['params'] / 1e6:.1f}M parameters = "
            f"{none['params'] / t['params']:.2f}x the teacher's {t['params'] / 1e6:.1f}M; "
            + (f"CPU latency {none['latency_ms']:.1f} ms = "
               f"{none['latency_ms'] / t['latency_ms']:.2f}x the teacher's "
               f"{t['latency_ms']:.1f} ms (PyTorch, 1 CPU thread, interleaved medians)."
               if none.get("latency_ms") and t.get("latency_ms") else ""))
        gap = (t["AP"] or 0) - (none["AP"] or 0)
        for name, r in by.items():
            if name.startswith("student-") and name != "student-none" and gap > 0:
                share = ((r["AP"] or 0) - (none["AP"] or 0)) / gap
                lines.append(f"{name}: {r['AP'] - none['AP']:+.1f} AP over no distillation, "
                             f"{100 * share:.0f}% of the teacher-student gap ({gap:.1f} AP).")
    return lines


def _write_report(out: Path, rows, table: str, gap: list[str], elapsed: float, plan: Plan,
                  quick: bool, figures: list[Path], teacher_cached: bool) -> Path:
    size = plan.student["model"]["min_size"]
    lines = [
        "# structkd demo", "",
        f"Command: `structkd demo{' --quick' if quick else ''}`; structkd {__version__}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {elapsed / 60:.1f} min"
        + (" (teacher from the cache)" if teacher_cached else "") + ".", "",
        table, "", *gap, "",
        "One seed; `structkd benchmark` gives the seed study. CPU ms: latency of one image "
        f"({size} px), eval mode, {LATENCY_THREADS} CPU thread, medians of calls interleaved "
        "between the four models (PyTorch and ONNX Runtime); the students share one "
        "architecture, so one student latency is shown for all. Train step ms: median time "
        "of a training step (batch 4, 2 threads).", "", "",
        *plan.notes, "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
