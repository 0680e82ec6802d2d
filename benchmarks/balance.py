"""What ``weight: auto`` sees and what watching the gradient-norm ratio costs.

Part 1, ``ratios`` (the built-in study's teacher and its untrained seed-0 student, the first 4
training batches of seed 0, as the study's calibration uses): for each method at its paper
weight, the gradient norms of the detection loss and of the distillation term on the student
parameters both reach, their ratio, and the weight ``auto`` would choose (ratio
``structkd.distill.DEFAULT_RATIO``). Needs the study's teacher in ``--cache`` (``structkd
benchmark`` or ``structkd demo`` trains it once).

Part 2, ``cost`` (RetinaNet ResNet-18 student, ResNet-50 teacher, random weights, as
``step_overhead.py``): a plain SSIM training step vs one preceded by the probing pass that
measures both gradient norms (a forward and two backward passes that leave no trace, what
``watch_every`` / ``auto_every`` do at their steps), interleaved; and one calibration over 4
batches. The per-step cost of watching every N steps is (measured step - plain step) / N.

    python benchmarks/balance.py                         # both parts
    python benchmarks/balance.py --parts cost --json balance.json
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from common import random_batch, step_parser, train_step
from structkd.distill import (
    DEFAULT_RATIO,
    Distiller,
    calibrate_weight,
    grad_norms,
    preserved_state,
    student_parameters,
)
from structkd.models import build_detector, load_exported
from structkd.timing import interleaved

METHODS = {"ssim": {"weight": 2.0}, "mse": {"weight": 2.0}, "pkd": {}, "cwd": {}, "mgd": {},
           "fgd": {}}


def ratios(cache: Path) -> list[dict]:
    from structkd.apps.plan import DEFAULT_PLAN as plan
    from structkd.apps.plan import cached_teacher, student_config
    from structkd.engine import DetectionDataModule, Loader
    from structkd.recipes import build_run

    teacher_dir = cached_teacher(plan, cache, [])
    if teacher_dir is None:
        raise SystemExit(f"no study teacher in {cache}: run `structkd benchmark --cache {cache}` "
                         "(or `structkd demo`) once")
    prefix = teacher_dir / "student"
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(student_config(plan, {"method": "none"}, prefix, cache, Path(tmp), 0, []))
    teacher, _, _ = load_exported(prefix)
    loader = DetectionDataModule(run.train, None, Loader(batch_size=4, num_workers=0),
                                 seed=0).train_dataloader()
    batches = [b for _, b in zip(range(4), loader, strict=False)]
    rows = []
    for name, options in METHODS.items():
        d = Distiller(copy.deepcopy(run.student).train(), teacher, name, **options)
        params = [p for _, p in student_parameters(d)]
        with preserved_state(d):
            torch.manual_seed(0)  # MGD's masks
            norms = [grad_norms(d(*b), params, retain_graph=False) for b in batches]
        det = sum(n.detection for n in norms) / len(norms)
        dis = sum(n.distill for n in norms) / len(norms)
        rows.append({"method": name, "weight": d.weight, "grad_detection": det,
                     "grad_distill": dis, "ratio": dis / det,
                     "auto_weight": DEFAULT_RATIO * det / (dis / d.weight)})
        d.close()
    return rows


def cost(size: int, batch: int, steps: int) -> dict:
    common = {"num_classes": 7, "fpn_channels": 256, "min_size": size, "max_size": size}
    batches = [random_batch(batch, size, s) for s in range(2)]
    nets = {}
    for mode in ("plain", "measured"):
        torch.manual_seed(0)
        student = build_detector(arch="retinanet", backbone="resnet18", **common)
        teacher = build_detector(arch="retinanet", backbone="resnet50", **common)
        net = Distiller(student, teacher, "ssim", weight=2.0).train()
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        nets[mode] = (net, opt, [p for _, p in student_parameters(net)])

    def probe(mode: str):
        """What DistillWatch does at a watched step, before it: a probing pass."""
        net, _, params = nets[mode]

        def measure(batch) -> None:
            with preserved_state(net), net.probing():
                grad_norms(net(*batch), params, retain_graph=False)

        return measure if mode == "measured" else None

    t = interleaved({m: train_step(*nets[m][:2], batches, before=probe(m)) for m in nets},
                    rounds=steps, warmup=1)
    net = nets["plain"][0]
    d = Distiller(copy.deepcopy(net.student), copy.deepcopy(net.teacher), "ssim",
                  weight="auto").train()
    start = time.perf_counter()
    calibrate_weight(d, [batches[i % 2] for i in range(4)])
    cal_s = time.perf_counter() - start
    plain, measured = t["plain"].median_ms, t["measured"].median_ms
    return {"plain_ms": plain, "measured_ms": measured, "measured_over_plain": measured / plain,
            "per_step_overhead_every_50": (measured - plain) / 50 / plain,
            "calibration_4_batches_s": cal_s, "calibration_in_plain_steps": 1000 * cal_s / plain,
            "size": size, "batch": batch, "steps": steps}


def main() -> None:
    p = step_parser(__doc__)
    p.add_argument("--parts", nargs="+", default=["ratios", "cost"], choices=["ratios", "cost"])
    p.add_argument("--cache", default="~/.cache/structkd", help="where the study's teacher is")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"meta": {"machine": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "threads": args.threads,
                          "torch": torch.__version__, "default_ratio": DEFAULT_RATIO}}
    if "ratios" in args.parts:
        out["ratios"] = ratios(Path(args.cache).expanduser())
        print("| method | paper weight | grad norm detection | grad norm distill | ratio | "
              f"auto weight (ratio {DEFAULT_RATIO:g}) |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in out["ratios"]:
            print(f"| {r['method']} | {r['weight']:.3g} | {r['grad_detection']:.4g} | "
                  f"{r['grad_distill']:.4g} | {r['ratio']:.3g} | {r['auto_weight']:.3g} |")
    if "cost" in args.parts:
        c = out["cost"] = cost(args.size, args.batch, args.steps)
        print(f"\nSSIM step {c['plain_ms']:.0f} ms; with both gradient norms measured "
              f"{c['measured_ms']:.0f} ms ({c['measured_over_plain']:.2f}x); watching every 50 "
              f"steps (the default) adds {100 * c['per_step_overhead_every_50']:.1f}% per step; "
              f"one calibration over 4 batches {c['calibration_4_batches_s']:.1f} s "
              f"(= {c['calibration_in_plain_steps']:.1f} plain steps).")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
