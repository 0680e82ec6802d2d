"""Training throughput with the teacher live and with its levels read from a cache.

Student RetinaNet ResNet-18 FPN, teacher RetinaNet ResNet-50 FPN (as ``step_overhead.py``),
random weights, random images of one size with boxes. Modes, interleaved step by step:
``plain`` (no distillation), ``live`` (SSIM, the teacher runs every step), ``cached`` (SSIM,
the teacher's levels read from a float16 cache written once before timing, the teacher not
built) and ``cached-int8`` (the same from an int8 cache). Prints ms per step, images per second
and the ratios to the plain step (target: the cached step within 1.05x of the plain one), and
the caches' size per image.

    python benchmarks/throughput.py
    python benchmarks/throughput.py --json benchmarks/results/throughput_cpu.json
    python benchmarks/throughput.py --device cuda --size 800 --batch 8
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from common import random_samples, step_parser, train_step
from structkd.distill import DetectorLosses, Distiller, cache_key, write_teacher_cache
from structkd.models import build_detector
from structkd.timing import interleaved


def main() -> None:
    p = step_parser(__doc__)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    common = {"num_classes": 7, "fpn_channels": 256, "min_size": args.size,
              "max_size": args.size}
    samples = random_samples(2 * args.batch, args.size, 0)

    def student():
        torch.manual_seed(0)
        return build_detector(arch="retinanet", backbone="resnet18", **common)

    torch.manual_seed(1)
    teacher = build_detector(arch="retinanet", backbone="resnet50", **common)
    tmp = tempfile.TemporaryDirectory()
    plain_images = [(img, {"image_id": t["image_id"]}) for img, t in samples]
    caches, per_image = {}, {}
    for dtype in ("float16", "int8"):
        key = cache_key(teacher=teacher, student=student(), teacher_layers="backbone",
                        teacher_root="backbone", teacher_dtype=None, data={"benchmark": True},
                        hflip=True, dtype=dtype)
        where = Path(tmp.name) / dtype
        caches[dtype] = write_teacher_cache(where, student(), teacher, plain_images, key=key,
                                            batch_size=args.batch, progress=False)
        per_image[dtype] = sum(f.stat().st_size for f in where.glob("*.safetensors")) / (
            len(samples) * 2)
    nets = {"plain": DetectorLosses(student()),
            "live": Distiller(student(), teacher, "ssim", weight=2.0),
            "cached": Distiller(student(), caches["float16"], "ssim", weight=2.0),
            "cached-int8": Distiller(student(), caches["int8"], "ssim", weight=2.0)}
    runs = {}
    for name, net in nets.items():
        net = net.to(args.device).train()
        opt = torch.optim.SGD([q for q in net.parameters() if q.requires_grad], lr=1e-3)
        runs[name] = (net, opt)
    batches = []
    for b in range(2):
        chunk = samples[b * args.batch:(b + 1) * args.batch]
        batches.append(([img.to(args.device) for img, _ in chunk],
                        [{k: (v.to(args.device) if torch.is_tensor(v) else v)
                          for k, v in t.items()} for _, t in chunk]))

    t = interleaved({m: train_step(*runs[m], batches) for m in runs}, rounds=args.steps, warmup=1,
                    device=args.device)
    med = {m: t[m].median_ms for m in runs}
    print(f"device={args.device} threads={args.threads} size={args.size} batch={args.batch} "
          f"student=retinanet/resnet18 teacher=retinanet/resnet50 steps={args.steps} "
          f"({platform.processor() or platform.machine()})")
    print("| mode | median ms/step | images/s | vs plain |")
    print("|---|---:|---:|---:|")
    for m in runs:
        print(f"| {m} | {med[m]:.0f} | {1000 * args.batch / med[m]:.2f} | "
              f"{med[m] / med['plain']:.3f} |")
    print(f"cache: {per_image['float16'] / 1024:.0f} KiB (float16), "
          f"{per_image['int8'] / 1024:.0f} KiB (int8) per image and variant (5 levels, 256 "
          f"channels, {args.size} px)")
    if args.json:
        meta = {**vars(args), "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "torch": torch.__version__}
        meta.pop("json")
        Path(args.json).write_text(json.dumps(
            {"meta": meta, "median_ms": med, "cached_over_plain": med["cached"] / med["plain"],
             "live_over_plain": med["live"] / med["plain"],
             "images_per_s": {m: 1000 * args.batch / med[m] for m in runs},
             "cached_int8_over_plain": med["cached-int8"] / med["plain"],
             "cache_bytes_per_image_variant": per_image,
             "times_ms": {m: list(x.times_ms) for m, x in t.items()}}, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
