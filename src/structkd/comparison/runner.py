"""``structkd.comparison``: does distillation help on *this* config? Methods x seeds, paired.

Every row of a comparison is the config's student trained with one distillation setting (or
none); per seed every row shares the initial student weights and the data order (both follow
``trainer.seed``) and the one teacher, so the rows differ only in the method; a row inherits
the config's distill keys it does not name. A row's run lives in ``<out>/seed<k>/<row>`` with
the digests of its teacher's files: a finished run of the same config and teacher is reused,
an interrupted one resumed from its last checkpoint; a folder that holds another comparison is
never overwritten (this one goes to ``<out>-2``, ...). The result holds,
per row, mean +- std of the COCO metrics, the paired gain over no distillation with a
confidence interval and a verdict; :mod:`structkd.comparison.report` writes it out.
"""

from __future__ import annotations

import hashlib
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
from ..distill import file_digest, tensors_fingerprint
from ..distill.teacher_cache import MANIFEST
from ..engine import RunResult, check_out_dir, holds_run, next_free
from ..evaluation import TABLE_KEYS
from ..methods import DEFAULT_METHOD, check_method, resolve_method
from ..recipes import Config, cache_teacher, load_config, run_config
from ..recipes.from_config import evaluate_checkpoint, resolve_data
from .stats import PairedGain, paired_gain

logger = logging.getLogger("structkd.comparison")

__all__ = ["Comparison", "Row", "compare", "metric_stats", "parse_rows", "resolve_row",
           "row_config", "run_row", "teacher_fingerprint"]

BASELINE = "none"


@dataclass(frozen=True)
class Row:
    """One row of a comparison: a name and the ``distill`` keys it sets (``method`` always;
    ``weight``, ``options`` and others, e.g. ``levels``, when it names them: the rest come
    from the config, see :func:`resolve_row`)."""

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
        return Row(str(name), d)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"method row {spec!r}; expected 'method', 'method:weight' "
                         "(a number, 'auto' or 'default') or a mapping")
    method, _, weight = spec.partition(":")
    if not weight:
        return Row(method, {"method": method})
    if weight in ("auto", "default"):
        return Row(f"{method}_{weight}",
                   {"method": method, "weight": "auto" if weight == "auto" else None})
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"method row {spec!r}: weight {weight!r} is neither a number nor "
                         "'auto' nor 'default'") from None
    return Row(f"{method}_{weight}", {"method": method, "weight": value})


def parse_rows(specs: Sequence[str | Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]
               ) -> list[Row]:
    """Rows from ``["none", "ssim", "ssim:4", "mgd:auto", "pkd:default", {"name": ...,
    "method": ...}]`` or a mapping name -> distill keys; "none" (the baseline) is added first
    when missing. ``METHOD:default`` is the method's own default weight."""
    if isinstance(specs, Mapping):
        rows = [_parse_one({"name": k, **v}) for k, v in specs.items()]
    else:
        rows = [_parse_one(s) for s in specs]
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method rows {dup} appear twice; give each row its own name")
    if not any(r.distill["method"] == BASELINE for r in rows):
        rows.insert(0, Row(BASELINE, {"method": BASELINE}))
    return rows


def _same_method(config_method: str, options: Mapping[str, Any], row_method: str) -> bool:
    """Whether a row's method is the config's one (an alias of the same class counts when the
    config's options agree with what the alias fixes, e.g. ``imitation`` + distance ssim)."""
    if row_method == config_method:
        return True
    try:
        cls_c, fixed_c = resolve_method(config_method)
        cls_r, fixed_r = resolve_method(row_method)
    except ValueError:
        return False  # an unknown name: load_config says so, naming the row
    effective = {**options, **fixed_c}
    return cls_c is cls_r and all(effective.get(k) == fixed_r.get(k)
                                  for k in {*fixed_c, *fixed_r})


def resolve_row(base: Config, row: Row) -> Row:
    """The row with the distill keys it trains with: those it names, the rest the config's.

    The config's ``distill.weight`` and ``distill.options`` set the config's method (null:
    ssim). A row of that method inherits both unless it names them. A row of another method
    inherits an ``auto`` weight (a measurement, not a scale) and the options its method
    accepts; a numeric weight (methods' scales differ by orders of magnitude) or an option its
    method rejects is an error naming the row, rather than a row quietly trained otherwise
    than the config says. The "none" row takes no weight and no options.
    """
    d = dict(row.distill)
    method = d["method"]
    if method == BASELINE:
        return Row(row.name, {**d, "weight": None, "options": {}})
    cfg = base.distill
    cfg_method = cfg.method or DEFAULT_METHOD  # null: the default with a teacher
    options = dict(cfg.options)
    same = _same_method(cfg_method, options, method)
    if "weight" not in d:
        if cfg.weight is not None and cfg.weight != "auto" and not same:
            raise ConfigError(
                f"method row {row.name!r}: distill.weight={cfg.weight!r} is the config's weight "
                f"for method {cfg_method!r}, and a weight does not carry over to method "
                f"{method!r} (the methods' scales differ); name the row's weight "
                f"('{method}:default' for {method}'s own, '{method}:W' or '{method}:auto'; "
                "'weight' in a mapping row) or remove distill.weight from the config")
        d["weight"] = cfg.weight
    if "options" not in d:
        if options and not same:
            try:
                check_method(method, options)
            except (ValueError, TypeError) as e:
                raise ConfigError(
                    f"method row {row.name!r}: the config's distill.options {options} (set for "
                    f"method {cfg_method!r}) do not fit method {method!r}: {e}; give the row "
                    f"its own options (a mapping row {{'name': {row.name!r}, 'method': "
                    f"{method!r}, 'options': {{...}}}}) or remove them from the config"
                ) from None
        d["options"] = options
    return Row(row.name, d)


def row_config(base: Config, row: Row, seed: int, out_dir: Path) -> Config:
    """``base`` with the row's distill keys (:func:`resolve_row`), ``trainer.seed`` and
    ``trainer.out_dir`` set."""
    d = base.to_dict()
    d["distill"].update(resolve_row(base, row).distill)
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


class _Digests:
    """sha256 (16 hex digits) of files, each read once per comparison (keyed by path, size
    and modification time); None for a missing file. A ``.safetensors`` file is hashed by its
    tensors in name order (:func:`~structkd.distill.tensors_fingerprint`): safetensors writes
    its header's metadata in an unspecified order, so two saves of the same weights differ as
    bytes."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._seen:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors = load_file(str(path))
                self._seen[key] = tensors_fingerprint(sorted(tensors.items()))
            else:
                self._seen[key] = file_digest(path)
        return self._seen[key]


def _teacher_files(t: Any) -> list[Path]:
    """The files a config's teacher is read from (an export's pair, a ``.ckpt``, a weights
    file, a family's file or folder); none for a builder's named weights or a hub name."""
    if t.checkpoint:
        p = Path(t.checkpoint).expanduser()
        if p.suffix == ".ckpt":
            return [p]
        prefix = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
        return [prefix.with_name(prefix.name + s) for s in (".json", ".safetensors")]
    if t.torchvision and t.weights and Path(t.weights).expanduser().is_file():
        return [Path(t.weights).expanduser()]
    if t.family and t.name:
        p = Path(str(t.name)).expanduser()
        if p.is_dir():
            return sorted(f for f in p.rglob("*") if f.is_file())
        if p.exists():
            return [p]
    return []


def teacher_fingerprint(cfg: Config, digests: _Digests | None = None) -> dict[str, Any] | None:
    """What a row's teacher is by content, recorded beside its run (``teacher_files.json``)
    so that a teacher replaced at the same path never lets an earlier run be reused: the
    sha256 of each of its files, or the key of a teacher cache's manifest (which holds the
    teacher's weights fingerprint). None for the "none" row, which has no teacher."""
    if cfg.distill.method == BASELINE:
        return None
    digests = digests or _Digests()
    t = cfg.teacher
    if t.cache:
        manifest = Path(t.cache).expanduser() / MANIFEST
        try:
            key = json.loads(manifest.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            key = None
        text = json.dumps(key, sort_keys=True).encode()
        return {"cache": str(t.cache),
                "key": None if key is None else hashlib.sha256(text).hexdigest()[:16]}
    return {"teacher": t.model_source(), "weights": t.weights,
            "files": {str(p): digests(p) for p in _teacher_files(t)}}


TEACHER_RECORD = "teacher_files.json"


def _read_record(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / TEACHER_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _write_record(out: Path, record: dict[str, Any] | None) -> None:
    if record is None:
        (out / TEACHER_RECORD).unlink(missing_ok=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / TEACHER_RECORD).write_text(json.dumps(record, indent=2))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted({*old, *new}, key=str)
                for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old == new:
        return []
    return [f"{prefix.rstrip('.')} {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _difference(cfg: Config, teacher: dict[str, Any] | None) -> str | None:
    """Why the row's folder holds a run other than the planned one (another config, or a
    teacher whose files changed since); None when it holds the planned run or none."""
    out = Path(cfg.trainer.out_dir)
    if not holds_run(out):
        return None
    try:
        saved = _identity(load_config(out / "config.yaml"))
    except (OSError, ValueError) as e:
        return f"its config.yaml cannot be read ({e})"
    keys = _changed_keys(saved, _identity(cfg))
    if keys:
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        return f"its config differs: {'; '.join(keys[:3])}{more}"
    stored = _read_record(out)
    if stored == teacher:
        return None
    if stored is None:
        return ("it holds no record of its teacher's files (a run of an earlier structkd): "
                "it may have been distilled from another teacher")
    if teacher is None:
        return "it records a teacher, which this row does not use"
    return f"its teacher changed since it was distilled ({_record_change(stored, teacher)})"


def _record_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which teacher file (or cache key) differs between two fingerprints, by digest."""
    files_old, files_new = old.get("files"), new.get("files")
    if isinstance(files_old, dict) and isinstance(files_new, dict) and \
            {k: v for k, v in old.items() if k != "files"} == \
            {k: v for k, v in new.items() if k != "files"}:
        return "; ".join(f"{Path(k).name}: {files_old.get(k) or 'missing'} -> "
                         f"{files_new.get(k) or 'missing'}" for k in sorted({*files_old,
                                                                               *files_new})
                         if files_old.get(k) != files_new.get(k))
    return "; ".join(_changed_keys(old, new)[:2])


def run_row(cfg: Config, callbacks: Sequence[L.Callback] = (), *,
            teacher: dict[str, Any] | None = None) -> tuple[RunResult, str]:
    """Run one row's config, reusing a finished run of the same config and teacher in its
    folder ("reused") or resuming an interrupted one ("resumed"); otherwise "trained" afresh
    there. ``teacher``: the row's :func:`teacher_fingerprint` (computed from ``cfg`` when not
    given), recorded beside the run and compared on reuse."""
    out = Path(cfg.trainer.out_dir)
    record = teacher if teacher is not None else teacher_fingerprint(cfg)
    why = _difference(cfg, record)
    same = why is None and (out / "config.yaml").is_file()
    if same and (out / "results.json").is_file() and (out / "student.safetensors").is_file():
        logger.info("reusing the finished run in %s", out)
        return RunResult.load(out), "reused"
    if same and (out / "checkpoints" / "last.ckpt").is_file():
        logger.info("resuming the interrupted run in %s", out)
        resumed = replace(cfg, trainer=replace(cfg.trainer, resume="last"))
        _write_record(out, record)
        return run_config(resumed, callbacks=callbacks), "resumed"
    if why is not None:
        # the record follows the run (written where it went), never an earlier run's folder
        logger.info("%s holds another run (%s); training this row there afresh", out, why)
    else:
        if holds_run(out):
            logger.info("%s holds an unfinished run of this row with no checkpoint; training "
                        "it afresh", out)
        _write_record(out, record)  # before training: an interrupted run can be resumed
    result = run_config(cfg, callbacks=callbacks)
    _write_record(result.out_dir, record)
    return result, "trained"


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


def _teacher_ap(cfg: Config, out: Path, teacher: dict[str, Any] | None) -> float | None:
    """The teacher's AP on the config's validation split (an export or checkpoint teacher;
    cached in ``<out>/teacher_eval.json`` by the teacher's file digests and the data)."""
    path = cfg.teacher.checkpoint
    if not path:
        return None
    src = Path(path).expanduser()
    cache = out / "teacher_eval.json"
    key = {"checkpoint": str(src), "teacher": teacher, "val": cfg.to_dict()["data"]}
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


def _at_levels(configs: dict[tuple[int, str], Config], where: Path
               ) -> dict[tuple[int, str], Config]:
    """Every distilling row pointed at the teacher's levels in ``where`` (its teacher unset)."""
    moved = {}
    for k, c in configs.items():
        d = c.to_dict()
        if d["distill"]["method"] != BASELINE:
            d["teacher"] = {**d["teacher"], "checkpoint": None, "torchvision": None,
                            "weights": None, "family": None, "name": None, "options": {},
                            "cache": str(where)}
        moved[k] = load_config(base=d)
    return moved


@dataclass
class _Layout:
    """A comparison planned into one folder: the teacher's run (from ``teacher_config``), the
    config with its teacher, each row's config, the teacher's fingerprint, and why the folder
    holds another comparison (empty: it holds none, or this one, finished or not)."""

    out: Path
    teacher_run: Config | None
    base: Config
    configs: dict[tuple[int, str], Config]
    teacher: dict[str, Any] | None
    conflicts: list[str]


def _layout(base: Config, rows: list[Row], seeds: int, out: Path, teacher_run: Config | None,
            teacher_prefix: Path | None, levels: bool, digests: _Digests) -> _Layout:
    """The comparison's runs in ``out`` (``teacher_prefix``: the export of the teacher trained
    from ``teacher_run``), checked against what ``out`` already holds."""
    t_run = None
    if teacher_run is not None:
        t_d = teacher_run.to_dict()
        t_d["distill"]["method"] = BASELINE
        t_d["trainer"]["out_dir"] = str(out / "teacher")
        t_run = load_config(base=t_d)
        d = base.to_dict()
        d["teacher"] = {"checkpoint": str(teacher_prefix or out / "teacher" / "student")}
        base = load_config(base=d)
    configs = {(s, r.name): row_config(base, r, s, out / f"seed{s}" / r.name)
               for s in range(seeds) for r in rows}  # every row checked before any training
    distils = any(r.distill["method"] != BASELINE for r in rows)
    teacher = teacher_fingerprint(next(c for c in configs.values()
                                       if c.distill.method != BASELINE), digests) \
        if distils else None
    if levels and distils:
        configs = _at_levels(configs, out / "teacher_levels")
    conflicts = []
    if t_run is not None and (why := _difference(t_run, None)):
        conflicts.append(f"teacher: {why}")
    for (s, name), c in configs.items():
        why = _difference(c, None if c.distill.method == BASELINE else teacher)
        if why:
            conflicts.append(f"seed{s}/{name}: {why}")
    return _Layout(out, t_run, base, configs, teacher, conflicts)


def compare(config: Config | str | os.PathLike, methods: Sequence[str | Mapping[str, Any]]
            | Mapping[str, Mapping[str, Any]] = (BASELINE, DEFAULT_METHOD), *, seeds: int = 3,
            out: str | os.PathLike = "structkd_compare", teacher: str | None = None,
            teacher_config: Config | str | os.PathLike | None = None,
            budget: float | None = None, overrides: Sequence[str] = (),
            confidence: float = 0.95, teacher_ap: float | None = None,
            teacher_levels: bool = False, report: bool = True,
            callbacks: Sequence[L.Callback] = ()) -> Comparison:
    """Train the config's student with each of ``methods`` over ``seeds`` seeds and compare.

    A folder that holds this comparison (same configs, same teacher files), finished or
    interrupted, is continued: finished runs reused, interrupted ones resumed (rows or seeds
    added are trained beside them; ``results.json`` describes this call's rows). One that holds
    another (a changed config or row, a teacher file replaced at the same path) is kept as it
    is: this comparison goes to the first free ``<out>-2``, ``<out>-3``, ... (or the one that
    holds it), as single runs do, and the log names the difference; ``Comparison.out`` says
    where.

    Args:
        config: a ``Config`` or a YAML path (the student, data, schedule; ``teacher``).
        methods: rows: "none", "ssim", "ssim:4" (a weight), "mgd:auto", "pkd:default", or
            mappings of ``distill`` keys with an optional ``name``; "none" is added when
            missing. A row inherits the config's distill keys it does not name
            (:func:`resolve_row`).
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
    check_out_dir(out, "out")  # before any work
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
    t_cfg = None
    if needs_teacher and not base.teacher.model_source():
        if teacher_config is None:
            raise ValueError("the rows distil but no teacher is given: set teacher= (or the "
                             "config's teacher section) or teacher_config= to train one")
        t_cfg = teacher_config if isinstance(teacher_config, Config) else \
            load_config(teacher_config)
    base, budget_info = _budget(base, budget)
    digests = _Digests()
    layouts: dict[Path, _Layout] = {}

    def layout(where: Path, prefix: Path | None = None) -> _Layout:
        if prefix is not None or where not in layouts:
            layouts[where] = _layout(base, rows, seeds, where, t_cfg, prefix, teacher_levels,
                                     digests)
        return layouts[where]

    plan = layout(out)
    if plan.conflicts:
        fresh = next_free(out, lambda p: p.exists() and bool(layout(p).conflicts))
        shown = "; ".join(plan.conflicts[:4]) + (
            f"; and {len(plan.conflicts) - 4} more" if len(plan.conflicts) > 4 else "")
        logger.warning("compare: %s holds another comparison, kept as it is (%s); this one "
                       "goes to %s", out, shown, fresh)
        out = fresh
        plan = layout(out)
    if plan.teacher_run is not None:
        t_res, how = run_row(plan.teacher_run, callbacks)
        logger.info("teacher: %s (%s), AP %.2f", t_res.out_dir, how, t_res.metrics["AP"])
        teacher_ap = t_res.metrics["AP"] if teacher_ap is None else teacher_ap
        plan = layout(out, t_res.export_prefix)  # the teacher's files as trained
    if teacher_ap is None and needs_teacher:
        teacher_ap = _teacher_ap(plan.base, out, plan.teacher)
    if teacher_levels and needs_teacher:
        first = next(r for r in rows if r.distill["method"] != BASELINE)
        where = out / "teacher_levels"
        logger.info("compare: every row reads the teacher's levels from %s (written once; "
                    "flips are replayed)", where)
        cache_teacher(row_config(plan.base, first, 0, out / "seed0" / first.name), where,
                      progress=base.trainer.progress)
    runs: dict[str, list[RunResult]] = {r.name: [] for r in rows}
    how: dict[str, list[str]] = {r.name: [] for r in rows}
    for s in range(seeds):
        for r in rows:
            logger.info("compare: seed %d, %s", s, r.name)
            c = plan.configs[s, r.name]
            result, what = run_row(c, callbacks, teacher=None if c.distill.method == BASELINE
                                   else plan.teacher)
            runs[r.name].append(result)
            how[r.name].append(what)
    resolved = [resolve_row(plan.base, r) for r in rows]
    result = Comparison(resolved, runs, seeds, confidence, teacher_ap, budget_info, out, how,
                        (time.perf_counter() - start) / 60)
    if report:
        from .report import write_report

        write_report(result)
    return result
