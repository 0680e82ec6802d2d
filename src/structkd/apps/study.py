"""``structkd benchmark``: the seed study on the built-in data, every method on equal terms.

Every student shares the teacher, the student architecture, the schedule, the data order and, per
seed, the initial weights; only the method differs. Each method runs at its paper weight and, as
a ``*_matched`` row, at a weight that gives its loss term the size of SSIM's (lambda 2) on the
first training batches of the untrained student: a calibration measured here and written into
the table. Writes ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..comparison import Comparison, compare, write_report
from ..comparison.report import cell
from ..distill import Distiller
from ..engine import DetectionDataModule, Loader, RunResult
from ..evaluation import TABLE_KEYS
from ..models import load_exported, torch_runner
from ..recipes import build_run
from ..timing import interleaved
from .plan import Plan, ensure_teacher, get_plan, student_config

logger = logging.getLogger("structkd.demo")
CALIBRATION_BATCHES = 4
REFERENCE = {"method": "ssim", "weight": 2.0}


@torch.no_grad()
def calibrate(plan: Plan, cache: Path, teacher_prefix: Path, names: list[str]) -> dict[str, Any]:
    """Weights that give each named method's term SSIM's size (lambda 2) at the start.

    On the first ``CALIBRATION_BATCHES`` training batches of seed 0 (the whole training split
    shuffled, as an epoch without ``limit_train`` draws it), with the untrained student of seed
    0 built as the runs build it: ``weight = term(SSIM, 2) / term(method, weight 1)`` (for FGD
    the weight scales its four preset term weights together).
    """
    with tempfile.TemporaryDirectory() as tmp:
        cfg = student_config(plan, {"method": "none"}, teacher_prefix, cache, Path(tmp), 0, [])
        run = build_run(cfg)
    teacher, _, _ = load_exported(teacher_prefix)
    loader = DetectionDataModule(run.train, None, Loader(batch_size=cfg.data.batch_size,
                                                         num_workers=0),
                                 seed=0).train_dataloader()
    batches = []
    for i, batch in enumerate(loader):
        if i >= CALIBRATION_BATCHES:
            break
        batches.append(batch)

    def term(method: str, **options: Any) -> float:
        d = Distiller(copy.deepcopy(run.student).train(), teacher, method, **options)
        torch.manual_seed(0)  # MGD's masks
        values = []
        for images, targets in batches:
            out = d(images, targets)
            values.append(float(sum(v for k, v in out.items() if k.startswith("distill"))))
        d.close()
        return statistics.fmean(values)

    ref = term(REFERENCE["method"], weight=REFERENCE["weight"])
    weights: dict[str, float] = {}
    units: dict[str, float] = {}
    for name in names:
        method = plan.methods[name]["method"]
        units[name] = term(method, weight=1.0)
        weights[name] = ref / units[name]
        logger.info("calibration: %s term at weight 1 = %.4g; SSIM (lambda 2) = %.4g; matched "
                    "weight %.4g", method, units[name], ref, weights[name])
    return {"reference_term": ref, "unit_terms": units, "weights": weights,
            "batches": CALIBRATION_BATCHES}


def run_benchmark(out: str | Path = "structkd_benchmark", *, seeds: int = 3, quick: bool = False,
                  cache: str | Path = "~/.cache/structkd",
                  results_md: str | Path | None = "benchmarks/RESULTS.md",
                  methods: list[str] | None = None,
                  teacher_levels: bool = False) -> dict[str, Any]:
    """``structkd compare`` on the plan: every method over ``seeds`` seeds against one cached
    teacher; writes the comparison's report into ``out`` and RESULTS.md. ``teacher_levels``:
    every student reads the teacher's levels from one cache instead of running it."""
    t_start = time.perf_counter()
    plan = get_plan(quick)
    out, cache = Path(out), Path(cache).expanduser()
    methods = methods or list(plan.study_methods)
    unknown = [m for m in methods if m not in plan.methods]
    if unknown:
        raise ValueError(f"methods {unknown} are unknown; expected some of {list(plan.methods)}")
    t_res = ensure_teacher(plan, cache, [])
    teacher = t_res.export_prefix
    assert teacher is not None
    matched = [m for m in methods if plan.methods[m].get("weight") == "matched"]
    calibration = calibrate(plan, cache, teacher, matched) if matched else None
    resolved = {}
    for m in methods:
        d = dict(plan.methods[m])
        if d.get("weight") == "matched":
            assert calibration is not None
            d["weight"] = float(f"{calibration['weights'][m]:.4g}")
        resolved[m] = d
    base = student_config(plan, {"method": "none"}, teacher, cache, out / "seed0" / "none", 0,
                          [])
    c = compare(base, resolved, seeds=seeds, out=out, teacher_ap=t_res.metrics["AP"],
                teacher_levels=teacher_levels, report=False)
    cmd = "structkd benchmark" + (f" --seeds {seeds}" if seeds != 3 else "") + (
        " --quick" if quick else "")
    write_report(c, command=cmd)
    runs = {m: c.runs[m] for m in methods}
    summary = _summarise(c, methods, resolved, t_res, teacher, plan)
    summary["compare"] = c.to_dict()
    summary["calibration"] = calibration
    summary["elapsed_min"] = (time.perf_counter() - t_start) / 60
    summary["runs"] = sum(len(rs) for rs in runs.values())
    summary["reused_runs"] = sum(h.count("reused") for h in c.how.values())
    summary["run_minutes"] = sum(r.wall_s or 0.0 for rs in runs.values() for r in rs) / 60
    c.out.mkdir(parents=True, exist_ok=True)  # where compare wrote (OUT-2 if OUT held another)
    (c.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    text = _results_markdown(summary, seeds, quick, plan)
    print(text)
    if results_md:
        Path(results_md).parent.mkdir(parents=True, exist_ok=True)
        Path(results_md).write_text(text)
    return summary


def _summarise(c: Comparison, methods: list[str], resolved, t_res: RunResult, teacher: Path,
               plan: Plan) -> dict[str, Any]:
    """The study's summary: the comparison's rows (statistics computed there) in the study's
    layout, the teacher, and the latency of teacher and student."""
    rows = {}
    paired = "none" in methods  # a study without the none row shows no gains
    for row in c.rows:
        if row.name not in methods:
            continue
        r = c.row_summary(row)
        g = r["gain"] if paired else None
        rows[row.name] = {
            "n": r["n"], "distill": resolved[row.name], "metrics": r["metrics"],
            "AP_runs": r["AP_per_seed"],
            "diff_vs_none": None if g is None else (g["mean"], g["sd"] or 0.0),
            "gap_closed": r["gap_closed"] if paired else None,
            "step_time_ms": math.nan if r["step_time_ms"] is None else r["step_time_ms"]}
    s_size = plan.student["model"]["min_size"]
    any_student = c.runs[methods[0]][0]
    t_model, _, _ = load_exported(teacher)
    s_model, _, _ = load_exported(any_student.export_prefix)
    lat = {n: t.median_ms for n, t in interleaved(
        {"teacher": torch_runner(t_model, plan.teacher["model"]["min_size"]),
         "student": torch_runner(s_model, s_size)}, warmup=3).items()}
    return {
        "rows": rows,
        "teacher": {"metrics": {k: t_res.metrics[k] for k in TABLE_KEYS},
                    "params": t_res.params, "latency_ms": lat["teacher"]},
        "student": {"params": any_student.params, "latency_ms": lat["student"]},
        "plan": {"teacher": plan.teacher, "student": plan.student, "data": plan.data},
    }


def _verdict(rows: dict[str, Any]) -> list[str]:
    """The demo's claim, checked: SSIM above none by more than twice the seed spread, and above
    L2 (the larger of the two sample stds is the spread); and SSIM against every other method."""
    if not {"none", "ssim"} <= set(rows) or rows["ssim"]["diff_vs_none"] is None:
        return []
    ap = {m: r["metrics"]["AP"] for m, r in rows.items()}
    spread = max(ap["none"][1], ap["ssim"][1])
    diff = rows["ssim"]["diff_vs_none"][0]
    out = [f"SSIM - none: {diff:+.2f} AP (paired mean); seed spread {spread:.2f} (larger sample "
           f"std of the two); more than twice the spread: {'yes' if diff > 2 * spread else 'NO'}."]
    for m in rows:
        if m in ("none", "ssim"):
            continue
        out.append(f"SSIM - {m}: {ap['ssim'][0] - ap[m][0]:+.2f} AP (means); SSIM above: "
                   f"{'yes' if ap['ssim'][0] > ap[m][0] else 'NO'}.")
    return out


def _weight_text(d: dict[str, Any], row: dict[str, Any] | None = None) -> str:
    w = d.get("weight")
    if w == "auto":
        used = [v for v in (row or {}).get("weights_used", []) if isinstance(v, int | float)]
        return "auto" + (f" ({min(used):.3g}–{max(used):.3g})" if used else "")
    return "-" if d["method"] == "none" else ("paper" if w is None else f"{w:g}")


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
        f"Invoked as: `structkd {shlex.join(sys.argv[1:])}`", "",
        "Teacher: " + json.dumps(plan.teacher["model"]) + "; student: "
        + json.dumps(plan.student["model"]) + "; student schedule: "
        + json.dumps(plan.student["schedule"]) + f"; data: {json.dumps(plan.data)}.", "",
        "| method | weight | n | AP | AP50 | AP75 | APs | APm | APl | AP - none (paired) | "
        "95% CI | gap closed | step ms | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = {r["name"]: r for r in s.get("compare", {}).get("rows", [])}
    for m, r in s["rows"].items():
        cells = [cell(r["metrics"][k]) for k in TABLE_KEYS]
        d = r["diff_vs_none"]
        dtxt = "-" if d is None else f"{d[0]:+.2f} ± {d[1]:.2f}"
        gap = "-" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f}%"
        g = (verdicts.get(m) or {}).get("gain")
        ci = "-" if not g or g["low"] is None else f"[{g['low']:+.2f}, {g['high']:+.2f}]"
        lines.append(f"| {m} | {_weight_text(r['distill'], verdicts.get(m))} | {r['n']} | "
                     + " | ".join(cells) + f" | {dtxt} | {ci} | {gap} | "
                     f"{r['step_time_ms']:.0f} | {g['verdict'] if g else 'baseline'} |")
    t = s["teacher"]
    cal = s.get("calibration")
    lines += [
        "", "Mean ± sample std over seeds; the paired difference is per seed (same seed, same "
        "initial weights, same data order) against the no-distillation student. 'gap closed': "
        "the mean paired gain as a share of the teacher's AP minus the plain student's. "
        "'weight': the method's overall weight ('paper': its default, `structkd methods`: the "
        "published preset for RetinaNet where it has presets).", "",
    ]
    if cal:
        lines += ["Matched weights (`*_matched` rows): the weight at which the method's loss "
                  f"term equals SSIM's (lambda 2: {cal['reference_term']:.4g}) on the first "
                  f"{cal['batches']} training batches of the untrained seed-0 student: "
                  + "; ".join(f"{m}: term at weight 1 = {cal['unit_terms'][m]:.4g} -> weight "
                              f"{w:.4g}" for m, w in cal["weights"].items()) + ".", ""]
    lines += [*_verdict(s["rows"]), "",
              "| model | AP | params | latency ms/image (CPU, interleaved medians) |",
              "|---|---:|---:|---:|",
              f"| teacher | {t['metrics']['AP']:.1f} | {t['params'] / 1e6:.1f}M | "
              f"{t['latency_ms']:.1f} |",
              f"| student | - | {s['student']['params'] / 1e6:.1f}M | "
              f"{s['student']['latency_ms']:.1f} |", ""]
    return "\n".join(lines)
