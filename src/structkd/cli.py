"""``structkd`` command line: a thin layer over the recipes, the apps and the engine.

Every key of the config schema (:class:`structkd.recipes.Config`) is a flag of the commands that
read a config (``--optim.lr 0.02``), parsed by the key's type; the commands' own flags
(``--teacher``, ``--method``, ``--overwrite``) set config keys as values, never as text.

    structkd train   -c CONFIG [--section.key VALUE ...] [--overwrite]
    structkd distill -c CONFIG --teacher PATH|BUILDER [--teacher-weights W] [--method M] [...]
    structkd eval    CHECKPOINT -c CONFIG [--out metrics.json]
    structkd export  RUN --onnx PATH [--size N]   (the student as ONNX, with its label map)
    structkd methods            (the distillation methods, their options and papers)
    structkd config  [-c CONFIG] [--section.key VALUE ...]   (the resolved config: every key)
    structkd data make|show ...
    structkd demo [--quick]
    structkd compare -c CONFIG --methods none ssim mgd:auto [--seeds 3] [--teacher PATH]
                     [--budget 0.25]   (paired seeds, a confidence interval, a verdict)
    structkd benchmark [--seeds 3]    (compare on the built-in study's plan)
    structkd cache-teacher -c CONFIG --teacher PATH --out DIR   (the teacher's levels, once)
    structkd configs            (list the shipped configs)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .defaults import DEFAULT_METHOD

log = logging.getLogger("structkd")

# Commands that read a config: every config key is also a flag of theirs (--optim.lr 0.02).
CONFIG_COMMANDS = ("train", "distill", "config", "eval", "compare", "cache-teacher")


def split_key_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its config-key flags, and those flags (``--section.key VALUE`` or
    ``--section.key=VALUE``: a dotted name, which no other flag has)."""
    rest: list[str] = []
    keys: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if token.startswith("--") and "." in name and len(name) > 2:
            keys.append(token)
            if "=" not in token and i + 1 < len(argv):
                keys.append(argv[i + 1])
                i += 1
        else:
            rest.append(token)
        i += 1
    return rest, keys


def _load(args: argparse.Namespace, *command: Mapping[str, Any], show: bool = True):
    """The run's config: the file, then the command's own flags (``--teacher``, ...), then
    ``--set`` texts, then the config-key flags, later ones winning."""
    from .config import parse_flags
    from .recipes import load_config, resolve_config_path
    from .recipes.schema import RENAMED, Config

    keys = parse_flags(Config, args.key_flags, renamed=RENAMED) if args.key_flags else {}
    layers = [*(c for c in command if c), *args.set, *([keys] if keys else [])]
    cfg = load_config(resolve_config_path(args.config), layers)
    if getattr(args, "trust_checkpoint", False):
        cfg.trust_checkpoints()
    if show:
        print("# resolved config\n" + cfg.to_yaml(), flush=True)
    return cfg


def _print_metrics(name: str, metrics: dict) -> None:
    from .evaluation import format_metrics_table

    print(format_metrics_table({name: metrics}))


def _run_keys(args: argparse.Namespace) -> dict[str, Any]:
    return {"trainer": {"overwrite": True}} if args.overwrite else {}


def _teacher_keys(args: argparse.Namespace) -> dict[str, Any]:
    """The ``teacher`` keys of ``--teacher`` (and ``--teacher-weights`` where the command has
    it)."""
    from .recipes import teacher_fields

    weights = getattr(args, "teacher_weights", None)
    if args.teacher:
        return {"teacher": teacher_fields(args.teacher, weights, flag="--teacher")}
    return {"teacher": {"weights": weights}} if weights else {}


def cmd_train(args: argparse.Namespace) -> int:
    from .recipes import run_config

    r = run_config(_load(args, _run_keys(args), {"distill": {"method": "none"}}))
    _print_metrics(str(r.out_dir), r.metrics)
    print(f"student exported to {r.export_prefix}.safetensors")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .recipes import run_config

    method = {"distill": {"method": args.method}} if args.method else {}
    cfg = _load(args, _run_keys(args), _teacher_keys(args), method, show=False)
    if cfg.distill.method == "none":
        raise ValueError("structkd distill with distill.method=none trains no student from a "
                         "teacher; use structkd train, or name a method (--method)")
    if cfg.distill.method is None:
        cfg.distill.method = DEFAULT_METHOD
    print("# resolved config\n" + cfg.to_yaml(), flush=True)
    r = run_config(cfg)
    _print_metrics(str(r.out_dir), r.metrics)
    print(f"student exported to {r.export_prefix}.safetensors")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .models.onnx import export_run

    path = export_run(args.run, args.onnx, image_size=args.size, opset=args.opset,
                      dynamic=args.dynamic)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    _, h, w = meta["input"]["shape"]
    size = "any H, W (dynamic)" if meta["input"]["dynamic"] else f"{h}x{w}"
    print(f"wrote {path}: {meta['arch']}, {len(meta['class_names']) - 1} classes, input one "
          f"RGB image 3x{size} in [0, 1] -> boxes, scores, labels; label map and spec also in "
          f"{path.name}.json")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .apps.listing import models_text

    print(models_text())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .apps.listing import methods_text

    print(methods_text())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(_load(args, show=False).to_yaml(), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checks import writable_file
    from .recipes import evaluate_checkpoint

    out = writable_file(args.out, "--out") if args.out else None  # before the evaluation
    metrics = evaluate_checkpoint(args.checkpoint, _load(args), device=args.device)
    _print_metrics(str(args.checkpoint), metrics)
    if metrics.get("per_class"):
        print("per-class AP: " + json.dumps({k: round(v, 1) for k, v in
                                             metrics["per_class"].items()}))
    if out is not None:  # after printing: a failed write loses nothing
        try:
            out.write_text(json.dumps(metrics, indent=2))
        except OSError as e:
            raise ValueError(f"--out {out}: cannot write the metrics ({e.strerror or e}); they "
                             "are printed above") from None
        print(f"metrics written to {out}")
    return 0


def cmd_data_make(args: argparse.Namespace) -> int:
    from .data import make_synthetic_coco

    p = make_synthetic_coco(args.root, num_train=args.num_train, num_val=args.num_val,
                            image_size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(f"train: {p.train_ann} ({p.train_images})\nval:   {p.val_ann} ({p.val_images})")
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from .data import draw_samples

    root = Path(args.root)
    ann = Path(args.ann) if args.ann else root / f"{args.split}.json"
    images = Path(args.images) if args.images else root / args.split
    preds = json.loads(Path(args.predictions).read_text()) if args.predictions else None
    out = draw_samples(ann, images, args.out, num=args.num, seed=args.seed, predictions=preds)
    print(f"wrote {out}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from .apps.listing import configs_text

    print(configs_text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .apps.demo import run_demo

    run_demo(out=args.out, quick=args.quick, cache=args.cache, seed=args.seed,
             overrides=args.set, overwrite=args.overwrite, teacher_levels=args.teacher_cache)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from .comparison import compare, write_report
    from .recipes import resolve_config_path

    cfg = _load(args, _teacher_keys(args), show=False)
    c = compare(cfg, args.methods, seeds=args.seeds, out=args.out,
                teacher_config=resolve_config_path(args.teacher_config),
                budget=args.budget, teacher_levels=args.teacher_cache, report=False)
    paths = write_report(c, command="structkd " + shlex.join(sys.argv[1:]))
    print(paths["report"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from .recipes import cache_teacher

    dtype = {"teacher": {"cache_dtype": args.dtype}} if args.dtype else {}
    cfg = _load(args, _teacher_keys(args), dtype, show=False)
    cache = cache_teacher(cfg, args.out, batch_size=args.batch_size,
                          progress=cfg.trainer.progress)
    print(f"teacher cache written to {cache.root}: {len(cache.index)} images x "
          f"{len(cache.variants)} variant(s) ({', '.join(cache.variants)}); train from it with "
          f"--teacher.cache {cache.root}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .apps.study import run_benchmark

    run_benchmark(out=args.out, seeds=args.seeds, quick=args.quick, cache=args.cache,
                  results_md=args.results_md, methods=args.methods,
                  teacher_levels=args.teacher_cache)
    return 0


_HELP = argparse.ArgumentDefaultsHelpFormatter


def _command(group, name: str, *, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return group.add_parser(name, help=help, formatter_class=_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="structkd", description="Structural (SSIM) knowledge distillation for detectors.",
        formatter_class=_HELP)
    p.add_argument("--version", action="version", version=f"structkd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", help="YAML file or shipped config name")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key with a YAML text, e.g. --set "
                        "optim.lr=0.02 (repeatable; the --section.key flags win over it)")
        sp.epilog = ("Every config key is a flag: --section.key VALUE, e.g. --optim.lr 0.02 "
                     "--schedule.epochs 12 --trainer.devices 2 --distill.options.window_size 7; "
                     "its value is checked against the key's type. `structkd config` prints "
                     "every key with its value.")

    def with_teacher(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--teacher", help="teacher: a structkd export prefix or .ckpt "
                        "(teacher.checkpoint), a torchvision detection builder name such as "
                        "retinanet_resnet50_fpn_v2 (teacher.torchvision), an Ultralytics .pt "
                        "or a transformers save_pretrained folder (teacher.family + "
                        "teacher.name); else the config's")

    def with_trust(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--trust-checkpoint", action="store_true",
                        help="load the Ultralytics .pt files of this run with Ultralytics' "
                        "unrestricted unpickler (and let transformers folders run their own "
                        "code): only for files you vouch for. By default a .pt is read with "
                        "weights_only=True against Ultralytics' allowlist and refused if its "
                        "pickle names anything else")

    def with_teacher_cache(sp: argparse.ArgumentParser, where: str) -> None:
        sp.add_argument("--teacher-cache", action="store_true",
                        help=f"write the teacher's levels once ({where}) and let every student "
                        "read them instead of running the teacher each step")

    def with_overwrite(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--overwrite", action="store_true",
                        help="replace a run already in trainer.out_dir (by default a finished "
                        "run is kept and this one goes to OUT_DIR-2, -3, ...)")

    sp = _command(sub, "train", help="train a plain detector (a teacher or a baseline)")
    with_config(sp)
    with_overwrite(sp)
    with_trust(sp)
    sp.set_defaults(func=cmd_train)

    sp = _command(sub, "distill", help="distil a teacher into a student")
    with_config(sp)
    with_overwrite(sp)
    with_teacher(sp)
    with_trust(sp)
    sp.add_argument("--teacher-weights", help="with a torchvision builder: its weights enum "
                    "(e.g. RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1) or a local .pth file")
    sp.add_argument("--method", metavar="NAME",
                    help="distillation method (distill.method): any registered name, including "
                    "those of the modules in distill.imports; `structkd methods` lists them")
    sp.set_defaults(func=cmd_distill)

    sp = _command(sub, "export", help="write a run's student as ONNX (no teacher, no adapters)")
    sp.add_argument("run", help="run directory holding student.safetensors + student.json, an "
                    "export prefix (RUN/student) or a run's .ckpt")
    sp.add_argument("--onnx", required=True, metavar="PATH",
                    help="ONNX file to write; its label map also goes to PATH.json")
    sp.add_argument("--size", type=int, metavar="N",
                    help="input side in pixels (default: the spec's min_size)")
    sp.add_argument("--dynamic", action="store_true",
                    help="accept any input height/width instead of a fixed N x N")
    sp.add_argument("--opset", type=int, default=17, help="ONNX opset (11 or later)")
    sp.set_defaults(func=cmd_export)

    sp = _command(sub, "methods", help="list the distillation methods with options and papers")
    sp.set_defaults(func=cmd_methods)

    sp = _command(sub, "models", help="list the detector families and what builds each here "
                  "(and what to install for the others)")
    sp.set_defaults(func=cmd_models)

    sp = _command(sub, "config", help="print the resolved config (every key, with the values "
                  "the defaults, the file and --set give)")
    with_config(sp)
    sp.set_defaults(func=cmd_config)

    sp = _command(sub, "eval", help="COCO box metrics of a saved detector on the val split")
    sp.add_argument("checkpoint", help="export prefix, .safetensors or .ckpt")
    with_config(sp)
    sp.add_argument("--out", help="write the metrics to this JSON file")
    sp.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    sp.set_defaults(func=cmd_eval)

    data = _command(sub, "data", help="the built-in synthetic dataset").add_subparsers(
        dest="data_command", required=True)
    sp = _command(data, "make", help="generate (or reuse) the synthetic COCO dataset")
    sp.add_argument("--root", default="~/.cache/structkd/synthetic", help="output folder")
    sp.add_argument("--num-train", type=int, default=512, help="training images")
    sp.add_argument("--num-val", type=int, default=128, help="validation images")
    sp.add_argument("--size", type=int, default=256, help="image side in pixels")
    sp.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same data)")
    sp.add_argument("--overwrite", action="store_true", help="regenerate even if it exists")
    sp.set_defaults(func=cmd_data_make)
    sp = _command(data, "show", help="render sample images with their boxes to a PNG")
    sp.add_argument("--root", default="~/.cache/structkd/synthetic", help="dataset folder")
    sp.add_argument("--split", default="val", choices=["train", "val"], help="which split")
    sp.add_argument("--ann", help="annotation JSON (default ROOT/SPLIT.json)")
    sp.add_argument("--images", help="image folder (default ROOT/SPLIT)")
    sp.add_argument("--predictions", help="COCO results JSON to draw as well")
    sp.add_argument("--out", default="samples.png", help="PNG to write")
    sp.add_argument("--num", type=int, default=8, help="number of images")
    sp.add_argument("--seed", type=int, default=0, help="which images (random sample seed)")
    sp.set_defaults(func=cmd_data_show)

    sp = _command(sub, "configs", help="list the shipped configs")
    sp.set_defaults(func=cmd_configs)

    sp = _command(sub, "demo", help="teacher + students (none, L2, SSIM) on the built-in data")
    sp.add_argument("--out", default="structkd_demo",
                    help="folder for the students' runs, report.md, results.json and plots")
    sp.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    sp.add_argument("--cache", default="~/.cache/structkd",
                    help="data and teacher cache, reused by later runs")
    sp.add_argument("--seed", type=int, default=0, help="the students' seed")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of every run's config")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace an earlier demo in --out (by default it is kept and this one "
                    "goes to OUT-2, OUT-3, ...)")
    with_teacher_cache(sp, "CACHE/teacher_levels")
    sp.set_defaults(func=cmd_demo)

    sp = _command(sub, "compare", help="does distillation help on this config? methods x "
                  "paired seeds, a confidence interval and a verdict")
    with_config(sp)
    sp.add_argument("--methods", nargs="+", default=["none", DEFAULT_METHOD], metavar="ROW",
                    help="rows: a method name, NAME:WEIGHT, NAME:auto or NAME:default (the "
                    "method's own weight); a row of the config's method inherits its "
                    "distill.weight and distill.options; 'none' (the baseline) is added when "
                    "missing")
    sp.add_argument("--seeds", type=int, default=3, help="seeds per row (0..N-1)")
    sp.add_argument("--out", default="structkd_compare",
                    help="folder for every run, results.json, report.md and gains.png "
                    "(finished runs of the same config and teacher files are reused, "
                    "interrupted ones resumed; a folder holding another comparison is kept "
                    "and this one goes to OUT-2)")
    with_teacher(sp)
    sp.add_argument("--teacher-config", metavar="CONFIG",
                    help="train the teacher once from this config (into OUT/teacher) when no "
                    "teacher is given")
    sp.add_argument("--budget", type=float, metavar="SHARE",
                    help="quick first answer: train on this share of the training images "
                    "(e.g. 0.25), stated in the report")
    with_teacher_cache(sp, "OUT/teacher_levels")
    with_trust(sp)
    sp.set_defaults(func=cmd_compare)

    sp = _command(sub, "cache-teacher", help="run the teacher once over the training set and "
                  "store its levels for every augmentation variant training can draw")
    with_config(sp)
    with_teacher(sp)
    sp.add_argument("--out", required=True, help="cache folder (an interrupted write continues "
                    "there)")
    sp.add_argument("--dtype", choices=["float16", "bfloat16", "float32", "int8"],
                    help="storage precision (teacher.cache_dtype; default float16)")
    sp.add_argument("--batch-size", type=int, default=8, help="images per teacher forward")
    with_trust(sp)
    sp.set_defaults(func=cmd_cache_teacher)

    sp = _command(sub, "benchmark", help="the seed study behind the demo's claim")
    sp.add_argument("--out", default="structkd_benchmark",
                    help="folder for every run (finished runs of the same config are reused)")
    sp.add_argument("--seeds", type=int, default=3, help="seeds per method")
    sp.add_argument("--quick", action="store_true", help="the smoke-sized plan")
    sp.add_argument("--cache", default="~/.cache/structkd", help="data and teacher cache")
    sp.add_argument("--results-md", default="benchmarks/RESULTS.md",
                    help="where to write the study's markdown table")
    sp.add_argument("--methods", nargs="+", help="subset of the study's method names")
    with_teacher_cache(sp, "OUT/teacher_levels")
    sp.set_defaults(func=cmd_benchmark)
    return p


def main(argv: list[str] | None = None) -> int:
    rest, key_flags = split_key_flags(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    if key_flags and args.command not in CONFIG_COMMANDS:
        parser.error(f"{key_flags[0].split('=', 1)[0]}: structkd {args.command} takes no config "
                     f"keys; the commands that read a config are {list(CONFIG_COMMANDS)}")
    args.key_flags = key_flags
    from .console import error_line, setup_console

    setup_console(args.verbose)
    try:
        return args.func(args)
    except Exception as e:
        message = error_line(e)
        if message is None or args.verbose:
            raise
        print(f"structkd: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
