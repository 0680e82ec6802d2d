"""Distillation inside Ultralytics' own trainer: a seed study on the built-in data.

The built-in synthetic dataset is converted to Ultralytics' layout
(:func:`structkd.data.yolo_format.to_yolo`). One teacher (``--teacher``, default YOLO11s) is
trained once by Ultralytics' trainer and saved; then, with the same data, epochs, recipe and
seeds for every row, a smaller student of the same generation (``--student``, YOLO11n) trains:

* ``none``: no distillation;
* ``ultralytics``: Ultralytics' built-in distillation (``distill_model=`` the teacher) at its
  default weight (``dis``);
* ``ssim``, ``cwd``, ``mgd``: structkd's methods through
  :func:`structkd.integrations.ultralytics.distill_trainer`, at their default weights;

and one cross-generation pair: the same YOLO11 teacher into a YOLO26 student
(``--cross-student``, with structkd's ``--cross-method``), against that student's own
no-distillation row. Metric: Ultralytics' validation mAP50-95 (and mAP50) of the run's
``best.pt``, as ``model.train`` reports it. The table gives mean +- sample std over seeds and the
paired gain over the same student without distillation with its 95% CI (Student's t over the
per-seed differences, :func:`structkd.comparison.stats.paired_gain`).

Resumable: every run writes ``result.json`` in its directory under ``--out``; a run or the
teacher whose result exists is reused, so an interrupted study continues where it stopped.

    python benchmarks/ultralytics_study.py --quick          # about half a minute on 2 CPU cores
    python benchmarks/ultralytics_study.py --out uls        # the defaults: about 40 min there

The defaults (256 train / 64 val images of 128 px, 12 student and 24 teacher epochs, batch 16)
fit about 40 minutes on 2 CPU cores; from scratch at that budget the models stay near 1-2 %
mAP50-95, so give a GPU more epochs and data (e.g. ``--imgsz 256 --num-train 2000 --epochs
50``) for differences above the seed noise. In ultralytics 8.4.190 the built-in distillation
also accepts the cross-generation pair; ``--cross-builtin`` adds its row.

Ultralytics is AGPL-3.0; it is imported here only when the study runs. ``YOLO_OFFLINE=1`` is set
unless the environment says otherwise (no update checks or downloads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from structkd.comparison.stats import paired_gain
from structkd.data import make_synthetic_coco
from structkd.data.yolo_format import to_yolo


@dataclass(frozen=True)
class Row:
    """One row of the table: a student, and how (if at all) it is distilled."""

    key: str
    student: str  # model YAML
    kind: str  # "none", "ultralytics" or "structkd"
    method: str | None = None
    baseline: str | None = None  # the row whose seeds the paired gain is taken against


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="ultralytics_study", help="study directory (resumable)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every row")
    p.add_argument("--epochs", type=int, default=12, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="teacher epochs (default: 2x --epochs)")
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--num-train", type=int, default=256, help="synthetic train images")
    p.add_argument("--num-val", type=int, default=64, help="synthetic val images")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher", default="yolo11s.yaml")
    p.add_argument("--student", default="yolo11n.yaml")
    p.add_argument("--cross-student", default="yolo26n.yaml",
                   help="the cross-generation student ('' to skip those rows)")
    p.add_argument("--cross-method", default="ssim")
    p.add_argument("--cross-builtin", action="store_true",
                   help="also run Ultralytics' built-in distillation on the cross pair")
    p.add_argument("--methods", default="ssim,cwd,mgd", help="structkd methods (default weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Ultralytics train arguments for every run, teacher included\n"
                        "(e.g. optimizer=SGD lr0=0.01); default: Ultralytics' recipe")
    p.add_argument("--quick", action="store_true",
                   help="tiny: 1 seed, 1 epoch, 16 train / 8 val images, imgsz 64")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs = 1, 1, 1
        args.num_train, args.num_val, args.imgsz, args.batch = 16, 8, 64, 8
    if args.teacher_epochs is None:
        args.teacher_epochs = 2 * args.epochs
    return args


def rows(args: argparse.Namespace) -> list[Row]:
    out = [Row("none", args.student, "none"),
           Row("ultralytics", args.student, "ultralytics", baseline="none")]
    out += [Row(m, args.student, "structkd", m, baseline="none")
            for m in args.methods.split(",") if m]
    if args.cross_student:
        tag = Path(args.cross_student).stem
        out += [Row(f"none@{tag}", args.cross_student, "none"),
                Row(f"{args.cross_method}@{tag}", args.cross_student, "structkd",
                    args.cross_method, baseline=f"none@{tag}")]
        if args.cross_builtin:
            out.append(Row(f"ultralytics@{tag}", args.cross_student, "ultralytics",
                           baseline=f"none@{tag}"))
    return out


def extra_args(pairs: list[str]) -> dict[str, Any]:
    """``--train-args`` as a dict (values read as YAML scalars: 0.01, SGD, false)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--train-args {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def train_kwargs(args: argparse.Namespace, data: Path, project: Path, name: str,
                 seed: int, epochs: int) -> dict[str, Any]:
    """Ultralytics' recipe (and ``--train-args``), the size of the run and where it goes."""
    return {**extra_args(args.train_args), "data": str(data), "epochs": epochs,
            "imgsz": args.imgsz, "batch": args.batch, "seed": seed, "device": args.device,
            "workers": 0, "project": str(project), "name": name, "exist_ok": True,
            "plots": False, "verbose": False}


def run_once(directory: Path, train: Any, signature: dict[str, Any]) -> dict[str, Any]:
    """``train()`` -> metrics, unless ``directory/result.json`` holds them for the same
    ``signature`` (what the run was asked to do); another signature there is refused."""
    result_file = directory / "result.json"
    if result_file.is_file():
        done = json.loads(result_file.read_text())
        if done.get("signature") != signature:
            raise SystemExit(f"{result_file} was made with other settings "
                             f"({done.get('signature')}); choose another --out")
        return {**done, "reused": True}
    start = time.perf_counter()
    model = train()
    seconds = time.perf_counter() - start
    metrics = model.metrics
    trainer = model.trainer
    result = {"map50_95": float(metrics.box.map), "map50": float(metrics.box.map50),
              "seconds": seconds, "epochs": int(trainer.epochs),
              "weights": str(trainer.best if trainer.best.exists() else trainer.last),
              "signature": signature}
    result_file.write_text(json.dumps(result, indent=2))
    return {**result, "reused": False}


def signature(args: argparse.Namespace, kwargs: dict[str, Any], **what: Any) -> dict[str, Any]:
    """What a run depends on: the data, its train arguments (not where it is written), the
    model and distillation."""
    return {"data": {"num_train": args.num_train, "num_val": args.num_val,
                     "imgsz": args.imgsz},
            "train": {k: v for k, v in kwargs.items() if k not in ("project", "name", "data")},
            **what}


def train_teacher(args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    from ultralytics import YOLO

    kwargs = train_kwargs(args, data, out, "teacher", 0, args.teacher_epochs)

    def go() -> Any:
        model = YOLO(args.teacher)
        model.train(**kwargs)
        return model

    return run_once(out / "teacher", go, signature(args, kwargs, model=args.teacher))


def train_row(args: argparse.Namespace, row: Row, seed: int, data: Path, runs: Path,
              teacher: Path) -> dict[str, Any]:
    from ultralytics import YOLO

    from structkd.integrations.ultralytics import distill_trainer

    name = f"{row.key.replace('@', '-')}_seed{seed}"

    kwargs = train_kwargs(args, data, runs, name, seed, args.epochs)

    def go() -> Any:
        model = YOLO(row.student)
        extra: dict[str, Any] = {}
        if row.kind == "ultralytics":
            extra["distill_model"] = str(teacher)
        elif row.kind == "structkd":
            extra["trainer"] = distill_trainer(teacher, str(row.method))
        model.train(**kwargs, **extra)
        return model

    return run_once(runs / name, go, signature(args, kwargs, model=row.student, kind=row.kind,
                                               method=row.method, teacher=str(teacher)))


def fmt(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarise(table_rows: list[Row], results: dict[str, list[dict[str, Any]]]
              ) -> list[dict[str, Any]]:
    """Per row: mAP values per seed (x100), mean, std, paired gain over its baseline."""
    out = []
    for row in table_rows:
        ap = [100 * r["map50_95"] for r in results[row.key]]
        ap50 = [100 * r["map50"] for r in results[row.key]]
        entry: dict[str, Any] = {**asdict(row), "map50_95": ap, "map50": ap50,
                                 "mean": statistics.fmean(ap),
                                 "std": statistics.stdev(ap) if len(ap) > 1 else None,
                                 "minutes": sum(r["seconds"] for r in results[row.key]) / 60}
        if row.baseline is not None:
            base = [100 * r["map50_95"] for r in results[row.baseline]]
            gain = paired_gain(ap, base)
            entry["gain"] = gain.to_dict()
            entry["verdict"] = gain.sentence()
        out.append(entry)
    return out


def markdown(command: str, config: dict[str, Any], summary: list[dict[str, Any]],
             teacher: dict[str, Any]) -> str:
    lines = [
        "# Distillation in Ultralytics' own trainer",
        "",
        f"Command: `{command}`",
        "",
        f"ultralytics {config['ultralytics']}, torch {config['torch']}, {config['machine']}; "
        f"{config['minutes']:.1f} min. Data: synthetic, {config['num_train']} train / "
        f"{config['num_val']} val images of {config['imgsz']} px, Ultralytics' recipe "
        f"(batch {config['batch']}, student epochs {config['epochs']}, seeds "
        f"{config['seeds']}). Teacher {config['teacher']} (epochs {config['teacher_epochs']}): "
        f"mAP50-95 {100 * teacher['map50_95']:.2f}. Ultralytics' built-in distillation at its "
        f"default weight dis={config['dis']}; structkd's methods at their default weights."
        + (f" Extra train arguments: {' '.join(config['train_args'])}." if config['train_args']
           else ""),
        "",
        "| row | student | distillation | n | mAP50-95 | mAP50 | gain (paired) | 95% CI | "
        "verdict | min |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for e in summary:
        how = {"none": "none", "ultralytics": "Ultralytics built-in"}.get(
            e["kind"], f"structkd {e['method']}")
        gain = e.get("gain")
        if gain is None:
            g, ci, verdict = "-", "-", "baseline"
        else:
            g = (f"{gain['mean']:+.2f}" + (f" ± {gain['sd']:.2f}" if gain["sd"] is not None
                                            else ""))
            ci = "-" if gain["low"] is None else f"[{gain['low']:+.2f}, {gain['high']:+.2f}]"
            verdict = gain["verdict"]
        lines.append(f"| {e['key']} | {Path(e['student']).stem} | {how} | {len(e['map50_95'])} "
                     f"| {fmt(e['map50_95'])} | {fmt(e['map50'])} | {g} | {ci} | {verdict} | "
                     f"{e['minutes']:.1f} |")
    lines += ["", "mAP x 100 on the val split (Ultralytics' validator, the run's best.pt); mean ± "
              "sample std over seeds; the gain is the per-seed difference to the same student "
              "without distillation (same seed, data and recipe), its CI Student's t.", ""]
    lines += [f"- {e['key']}: {e['verdict']}" for e in summary if "verdict" in e]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    command = "python benchmarks/ultralytics_study.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    coco = make_synthetic_coco(out / "data" / "coco", num_train=args.num_train,
                               num_val=args.num_val, image_size=args.imgsz, seed=0)
    data = to_yolo(coco.train_ann, coco.train_images, coco.val_ann, coco.val_images,
                   out / "data" / "yolo")
    import ultralytics
    from ultralytics.utils import DEFAULT_CFG_DICT

    teacher = train_teacher(args, data, out)
    teacher_pt = Path(teacher["weights"])
    table_rows = rows(args)
    results: dict[str, list[dict[str, Any]]] = {r.key: [] for r in table_rows}
    for seed in range(args.seeds):  # seed-major: an interrupted study has whole seeds
        for row in table_rows:
            result = train_row(args, row, seed, data, out / "runs", teacher_pt)
            results[row.key].append({**result, "seed": seed})
            print(f"[ultralytics_study] {row.key} seed {seed}: mAP50-95 "
                  f"{100 * result['map50_95']:.2f} ({result['seconds']:.0f} s"
                  f"{', reused' if result['reused'] else ''})", flush=True)
    summary = summarise(table_rows, results)
    config = {**{k: v for k, v in vars(args).items() if k != "json"},
              "seeds": list(range(args.seeds)), "ultralytics": ultralytics.__version__,
              "torch": torch.__version__, "dis": DEFAULT_CFG_DICT.get("dis"),
              "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), threads "
                         f"{torch.get_num_threads()}, device {args.device}",
              "minutes": (time.perf_counter() - start) / 60}
    report = {"command": command, "config": config, "teacher": teacher, "rows": summary,
              "runs": results}
    text = markdown(command, config, summary, teacher)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(text)
    return report


if __name__ == "__main__":
    main()
