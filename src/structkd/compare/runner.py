"""``structkd.compare``: does distillation help on *this* config? Methods x seeds, paired.

Every row of a comparison is the config's student trained with one distillation setting (or
none); per seed every row shares the initial student weights and the data order (both follow
``trainer.seed``) and the one teacher, so the rows differ only in the method. A row's run lives
in ``<out>/seed<k>/<row>``: a finished run of the same config is reused, an interrupted one is
resumed from its last checkpoint, anything else in that folder is replaced. The result holds,
per row, mean +- std of the COCO metrics, the paired gain over no distillation with a
confidence interval and a verdict; :mod:`structkd.compare.report` writes it out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L

from ..config import ConfigError
from ..engine import Config, RunResult, holds_run, load_config, run_config
from ..engine.from_config import evaluate_checkpoint, resolve_data
from ..evaluation import TABLE_KEYS
from .stats import PairedGain, paired_gain

logger = logging.getLogger("structkd.compare")

__all__ = ["Comparison", "Row", "compare", "metric_stats", "parse_rows", "row_config", "run_row"]

BASELINE = "none"


@dataclass(frozen=True)
class Row:
    """One row of a comparison: a name and the ``distill`` keys it sets (``method``,
    ``weight`` and ``options`` always; others, e.g. ``levels``, when given)."""

    name: str
    distill: dict[str, Any]


def _parse_one(spec: str | Mapping[str, Any]) -> Row:
    if isinstance(spec, Mapping):
        d = dict(spec)
        name = d.pop("name", None)
        if "method" not in d:
            raise ValueError(f"method row {spec!r} has no 'method'; expected e.g. "
                             "{'method': 'ssim', 'weight': 2}")
        if name is None:
            name = d["method"] if d.get("weight") is None else f"{d['method']}_{d['weight']}"
        return Row(str(name), {"weight": None, "options": {}, **d})
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"method row {spec!r}; expected 'method', 'method:weight' "
                         "(a number or 'auto') or a mapping")
    method, _, weight = spec.partition(":")
    if not weight:
        return Row(method, {"method": method, "weight": None, "options": {}})
    if weight == "auto":
        return Row(f"{method}_auto", {"method": method, "weight": "auto", "options": {}})
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"method row {spec!r}: weight {weight!r} is neither a number nor "
                         "'auto'") from None
    return Row(f"{method}_{weight}", {"method": method, "weight": value, "options": {}})


def parse_rows(specs: Sequence[str | Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]
               ) -> list[Row]:
    """Rows from ``["none", "ssim", "ssim:4", "mgd:auto", {"name": ..., "method": ...}]`` or
    a mapping name -> distill keys; "none" (the baseline) is added first when missing."""
    if isinstance(specs, Mapping):
        rows = [_parse_one({"name": k, **v}) for k, v in specs.items()]
    else:
        rows = [_parse_one(s) for s in specs]
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method rows {dup} appear twice; give each row its own name")
    if not any(r.distill["method"] == BASELINE for r in rows):
        rows.insert(0, Row(BASELINE, {"method": BASELINE, "weight": None, "options": {}}))
    return rows


def row_config(base: Config, row: Row, seed: int, out_dir: Path) -> Config:
    """``base`` with the row's distill keys, ``trainer.seed`` and ``trainer.out_dir`` set."""
    d = base.to_dict()
    d["distill"].update(row.distill)
    d["trainer"].update({"seed": seed, "out_dir": str(out_dir), "resume": None,
                         "overwrite": True})
    try:
        return load_config(base=d)
    except ConfigError as e:
        raise ConfigError(f"method row {row.name!r}: {e}") from None


def _identity(cfg: Config) -> dict[str, Any]:
    """What a reused or resumed run must share with the planned one (not how it is driven)."""
    d = cfg.to_dict()
    for k in ("resume", "overwrite", "progress", "threads"):
        d["trainer"].pop(k, None)
    return d


def run_row(cfg: Config, callbacks: Sequence[L.Callback] = ()) -> tuple[RunResult, str]:
    """Run one row's config, reusing a finished run of the same config in its folder
    ("reused") or resuming an interrupted one ("resumed"); otherwise "trained" afresh."""
    out = Path(cfg.trainer.out_dir)
    same = False
    if (out / "config.yaml").is_file():
        try:
            same = _identity(load_config(out / "config.yaml")) == _identity(cfg)
        except (OSError, ValueError):
            same = False
    if same and (out / "results.json").is_file() and (out / "student.safetensors").is_file():
        logger.info("reusing the finished run in %s", out)
        return RunResult.load(out), "reused"
    if same and (out / "checkpoints" / "last.ckpt").is_file():
        logger.info("resuming the interrupted run in %s", out)
        resumed = replace(cfg, trainer=replace(cfg.trainer, resume="last"))
        return run_config(resumed, callbacks=callbacks), "resumed"
    if holds_run(out):
        logger.info("%s holds another or an unfinished run; training this row there afresh",
                    out)
    return run_config(cfg, callbacks=callbacks), "trained"


def metric_stats(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std; (-1, 0) when COCO left the metric undefined (-1) in any run."""
    if any(x < 0 for x in xs):
        return -1.0, 0.0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class Comparison:
    """A finished comparison; ``to_dict()`` is its ``results.json``."""

    rows: list[Row]
    runs: dict[str, list[RunResult]]
    seeds: int
    confidence: float
    teacher_ap: float | None
    budget: dict[str, Any] | None
    out: Path
    how: dict[str, list[str]] = field(default_factory=dict)  # row -> reused/resumed/trained
    elapsed_min: float = 0.0

    def gain(self, name: str) -> PairedGain | None:
        if name == BASELINE or BASELINE not in self.runs:
            return None
        return paired_gain([r.metrics["AP"] for r in self.runs[name]],
                           [r.metrics["AP"] for r in self.runs[BASELINE]], self.confidence)

    def row_summary(self, row: Row) -> dict[str, Any]:
        rs = self.runs[row.name]
        g = self.gain(row.name)
        base = self.runs.get(BASELINE)
        gap = None
        if g is not None and base and self.teacher_ap is not None:
            span = self.teacher_ap - statistics.fmean(r.metrics["AP"] for r in base)
            gap = g.mean / span if span > 0 else None
        steps = [r.step_time_s for r in rs if r.step_time_s]
        weights = [(r.distill or {}).get("weight") for r in rs]
        return {
            "name": row.name, "distill": row.distill, "n": len(rs),
            "metrics": {k: metric_stats([r.metrics[k] for r in rs]) for k in TABLE_KEYS},
            "AP_per_seed": [r.metrics["AP"] for r in rs],
            "gain": g.to_dict() if g is not None else None,
            "verdict": g.sentence() if g is not None else None,
            "gap_closed": gap,
            "step_time_ms": 1000 * statistics.median(steps) if steps else None,
            "weights_used": weights,
            "distill_share": [((r.distill or {}).get("watch") or {}).get("distill_share")
                              for r in rs],
            "runs": [str(r.out_dir) for r in rs], "how": self.how.get(row.name, []),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "confidence": self.confidence,
                "teacher_AP": self.teacher_ap, "budget": self.budget,
                "elapsed_min": self.elapsed_min,
                "rows": [self.row_summary(r) for r in self.rows]}


def _teacher_ap(cfg: Config, out: Path) -> float | None:
    """The teacher's AP on the config's validation split (an export or checkpoint teacher;
    cached in ``<out>/teacher_eval.json`` by path and modification time)."""
    path = cfg.teacher.checkpoint
    if not path:
        return None
    src = Path(path).expanduser()
    files = [p for p in (src, src.with_suffix(".safetensors")) if p.is_file()]
    stamp = max((p.stat().st_mtime_ns for p in files), default=0)
    cache = out / "teacher_eval.json"
    key = {"checkpoint": str(src), "mtime_ns": stamp, "val": cfg.to_dict()["data"]}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["AP"]
    logger.info("evaluating the teacher %s on the validation split", src)
    metrics = evaluate_checkpoint(src, cfg)
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "AP": metrics["AP"]}, indent=2))
    return float(metrics["AP"])


def _budget(cfg: Config, budget: float | None) -> tuple[Config, dict[str, Any] | None]:
    """A quick first answer: train on the first ``budget`` share of the training images (the
    schedule's epochs, milestones and warm-up unchanged, so every step count shrinks alike)."""
    if budget is None or budget == 1:
        return cfg, None
    if not (isinstance(budget, int | float) and 0 < budget <= 1):
        raise ValueError(f"budget={budget!r}; expected a share of the training data in (0, 1]")
    paths = resolve_data(cfg)
    try:
        n = len(json.loads(paths.train_ann.read_text())["images"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"budget: cannot count the images of {paths.train_ann} ({e})") from None
    if cfg.data.limit_train:
        n = min(n, cfg.data.limit_train)
    keep = max(1, math.floor(budget * n))
    d = cfg.to_dict()
    d["data"]["limit_train"] = keep
    return load_config(base=d), {"share": budget, "train_images": keep, "of": n}


def _from_levels(base: Config, configs: dict[tuple[int, str], Config],
                 out: Path) -> dict[tuple[int, str], Config]:
    """Write the teacher's levels once and point every distilling row at them."""
    from ..engine import cache_teacher

    first = next(c for c in configs.values() if c.distill.method != BASELINE)
    where = out / "teacher_levels"
    logger.info("compare: every row reads the teacher's levels from %s (written once; flips "
                "are replayed)", where)
    cache = cache_teacher(first, where, progress=base.trainer.progress)
    moved = {}
    for k, c in configs.items():
        d = c.to_dict()
        if d["distill"]["method"] != BASELINE:
            d["teacher"] = {**d["teacher"], "checkpoint": None, "torchvision": None,
                            "weights": None, "cache": str(cache.root)}
        moved[k] = load_config(base=d)
    return moved


def compare(config: Config | str | os.PathLike, methods: Sequence[str | Mapping[str, Any]]
            | Mapping[str, Mapping[str, Any]] = ("none", "ssim"), *, seeds: int = 3,
            out: str | os.PathLike = "structkd_compare", teacher: str | None = None,
            teacher_config: Config | str | os.PathLike | None = None,
            budget: float | None = None, overrides: Sequence[str] = (),
            confidence: float = 0.95, teacher_ap: float | None = None,
            teacher_levels: bool = False, report: bool = True,
            callbacks: Sequence[L.Callback] = ()) -> Comparison:
    """Train the config's student with each of ``methods`` over ``seeds`` seeds and compare.

    Args:
        config: a ``Config`` or a YAML path (the student, data, schedule; ``teacher``).
        methods: rows: "none", "ssim", "ssim:4" (a weight), "mgd:auto", or mappings of
            ``distill`` keys with an optional ``name``; "none" is added when missing.
        seeds: seeds 0..seeds-1; each seed's rows share initial weights and data order.
        teacher: a teacher checkpoint or export (replaces the config's ``teacher``).
        teacher_config: a config to train the teacher once (in ``<out>/teacher``; reused
            while its config is unchanged) when no teacher is given.
        budget: train on this share of the training images for a quick first answer.
        overrides: ``section.key=value`` applied to ``config``.
        teacher_ap: the teacher's AP if already known (else measured for a checkpoint teacher).
        teacher_levels: write the teacher's levels once (``<out>/teacher_levels``) and let
            every row read them instead of running the teacher each step.
        report: write ``results.json``, ``report.md`` and ``gains.png`` into ``out``.
    """
    start = time.perf_counter()
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r}; expected an int >= 1")
    out = Path(out)
    rows = parse_rows(methods)
    base = config if isinstance(config, Config) else load_config(config, overrides)
    if isinstance(config, Config) and overrides:
        base = load_config(base=config.to_dict(), overrides=list(overrides))
    if teacher is not None:
        d = base.to_dict()
        d["teacher"] = {"checkpoint": str(teacher)}
        base = load_config(base=d)
    needs_teacher = any(r.distill["method"] != BASELINE for r in rows)
    if needs_teacher and not base.teacher.model_source():
        if teacher_config is None:
            raise ValueError("the rows distil but no teacher is given: set teacher= (or the "
                             "config's teacher section) or teacher_config= to train one")
        t_cfg = teacher_config if isinstance(teacher_config, Config) else \
            load_config(teacher_config)
        t_d = t_cfg.to_dict()
        t_d["distill"]["method"] = BASELINE
        t_d["trainer"]["out_dir"] = str(out / "teacher")
        t_res, how = run_row(load_config(base=t_d), callbacks)
        logger.info("teacher: %s (%s), AP %.2f", t_res.out_dir, how, t_res.metrics["AP"])
        teacher_ap = t_res.metrics["AP"] if teacher_ap is None else teacher_ap
        d = base.to_dict()
        d["teacher"] = {"checkpoint": str(t_res.export_prefix)}
        base = load_config(base=d)
    base, budget_info = _budget(base, budget)
    configs = {(s, r.name): row_config(base, r, s, out / f"seed{s}" / r.name)
               for s in range(seeds) for r in rows}  # every row checked before any training
    if teacher_ap is None and needs_teacher:
        teacher_ap = _teacher_ap(base, out)
    if teacher_levels and needs_teacher:
        configs = _from_levels(base, configs, out)
    runs: dict[str, list[RunResult]] = {r.name: [] for r in rows}
    how: dict[str, list[str]] = {r.name: [] for r in rows}
    for s in range(seeds):
        for r in rows:
            logger.info("compare: seed %d, %s", s, r.name)
            result, what = run_row(configs[s, r.name], callbacks)
            runs[r.name].append(result)
            how[r.name].append(what)
    result = Comparison(rows, runs, seeds, confidence, teacher_ap, budget_info, out, how,
                        (time.perf_counter() - start) / 60)
    if report:
        from .report import write_report

        write_report(result)
    return result
