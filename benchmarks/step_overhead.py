"""Training-step time of a distilled student vs a plain one (forward, backward, optimiser step).

Student: RetinaNet ResNet-18 FPN; teacher: RetinaNet ResNet-50 FPN (frozen, eval mode, backbone
and neck only), both at the same input size, random initialisation, synthetic images with boxes.
Modes: ``none`` (plain student), ``mse`` and ``ssim`` (``Distiller`` with lambda = 2, teacher in
fp32), ``pkd``, ``cwd``, ``mgd``, ``fgd`` (each at its paper defaults, RetinaNet preset) and
``ssim_bf16t`` (SSIM with ``teacher_dtype="bfloat16"``: the teacher's forward in bf16, which
CPUs with native bf16 run about twice as fast; the student stays fp32). The modes run in one
process, interleaved step by step, so slow drifts of a shared machine hit all alike; the table
gives the median step time, the ratio to the plain step and to the MSE step (the targets:
every method within 1.10x of MSE).

    python benchmarks/step_overhead.py                       # CPU, 256 px, batch 4
    python benchmarks/step_overhead.py --json step.json      # and JSON
    python benchmarks/step_overhead.py --device cuda --size 800 --batch 8
"""

from __future__ import annotations

import json
import os
import platform

import torch

from common import random_batch, step_parser, train_step
from structkd.distill import DetectorLosses, Distiller
from structkd.models import build_detector
from structkd.timing import interleaved

MODES = ("none", "mse", "ssim", "pkd", "cwd", "mgd", "fgd", "ssim_bf16t")


def build(mode: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    common = {"num_classes": 7, "fpn_channels": args.fpn, "min_size": args.size,
              "max_size": args.size}
    student = build_detector(arch="retinanet", backbone=args.student, **common)
    if mode == "none":
        net: torch.nn.Module = DetectorLosses(student)
    else:
        teacher = build_detector(arch="retinanet", backbone=args.teacher, **common)
        method = mode.removesuffix("_bf16t")
        options = {"weight": 2.0} if method in ("mse", "ssim") else {}
        net = Distiller(student, teacher, method, **options,
                        teacher_dtype="bfloat16" if mode.endswith("_bf16t") else None)
    net = net.to(args.device).train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)
    return net, opt


def main() -> None:
    p = step_parser(__doc__)
    p.add_argument("--fpn", type=int, default=256)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="which modes to time ('none' always runs)")
    args = p.parse_args()
    modes = ["none", *[m for m in args.modes if m != "none"]]
    torch.set_num_threads(args.threads)
    runs = {m: build(m, args) for m in modes}
    batches = [random_batch(args.batch, args.size, s, args.device) for s in range(2)]

    # One warm-up step per mode, then args.steps rounds; CUDA is synchronised around each step.
    timings = interleaved({m: train_step(*runs[m], batches) for m in modes},
                          rounds=args.steps, warmup=1,
                          device=args.device)
    med = {m: timings[m].median_ms for m in modes}
    print(f"device={args.device} threads={args.threads} size={args.size} batch={args.batch} "
          f"student=retinanet/{args.student} teacher=retinanet/{args.teacher} "
          f"fpn={args.fpn} steps={args.steps} ({platform.processor() or platform.machine()})")
    mse = med.get("mse")
    print("| mode | median ms/step | min ms/step | vs none | vs mse |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        vs_mse = f"{med[m] / mse:.3f}" if mse else "-"
        print(f"| {m} | {med[m]:.0f} | {timings[m].min_ms:.0f} | {med[m] / med['none']:.3f} "
              f"| {vs_mse} |")
    ratios = {f"{m}_over_none": med[m] / med["none"] for m in modes if m != "none"}
    if mse:
        ratios.update({f"{m}_over_mse": med[m] / mse for m in modes if m not in ("none", "mse")})
        slow = [m for m in modes if m not in ("none", "mse", "ssim_bf16t")
                and med[m] / mse > 1.10]
        print("within 1.10x of the MSE step: " + ("all" if not slow else f"all but {slow}"))
    if args.json:
        meta = {**vars(args), "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "torch": torch.__version__}
        meta.pop("json")
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "median_ms": med, "ratios": ratios,
                       "times_ms": {m: list(t.times_ms) for m, t in timings.items()}}, f,
                      indent=2)


if __name__ == "__main__":
    main()
