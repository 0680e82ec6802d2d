"""Forward+backward time and peak memory of feature-distillation losses on RetinaNet FPN levels.

Inputs: the five RetinaNet neck levels of an 800x1333 image (P3 100x168 ... P7 7x11), batch 2,
256 channels; the loss is min-max normalisation + distance + mean, summed over levels, with the
gradient taken w.r.t. the student. Each method runs in its own subprocess so that peak memory
(resident-set high-water mark on CPU, max allocated on CUDA) is its own.

    python benchmarks/loss_speed.py                    # table
    python benchmarks/loss_speed.py --json out.json    # and JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

LEVELS = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
METHODS = {
    "structkd-ssim": "structkd SSIMLoss (same/reflect, fused)",
    "structkd-ssim-valid": "structkd SSIMLoss (valid)",
    "structkd-mse": "structkd MSELoss (min-max)",
    "torch-mse": "F.mse_loss, no normalisation",
    "pytorch-msssim": "pytorch_msssim.ssim (valid), autograd min-max",
    "kornia": "kornia ssim_loss (reflect), autograd min-max",
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _autograd_minmax(t):
    lo = t.amin(dim=(1, 2, 3), keepdim=True)
    hi = t.amax(dim=(1, 2, 3), keepdim=True)
    return (t - lo) / (hi - lo + 1e-6)


def _build(method: str):
    import torch.nn.functional as F

    if method.startswith("structkd"):
        from structkd.losses import MSELoss, SSIMLoss

        fn = {
            "structkd-ssim": SSIMLoss(),
            "structkd-ssim-valid": SSIMLoss(padding="valid"),
            "structkd-mse": MSELoss(),
        }[method]
        return fn
    if method == "torch-mse":
        return F.mse_loss
    if method == "pytorch-msssim":
        from pytorch_msssim import ssim

        def msssim_loss(s, t):
            return (1 - ssim(_autograd_minmax(s), _autograd_minmax(t), data_range=1.0)) / 2

        return msssim_loss
    if method == "kornia":
        import kornia

        def kornia_loss(s, t):
            # kornia's ssim_loss is mean((1 - SSIM) / 2), reflect padding.
            return kornia.losses.ssim_loss(_autograd_minmax(s), _autograd_minmax(t), 11)

        return kornia_loss
    raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")


def run_one(method: str, device: str, reps: int, threads: int) -> dict:
    """Time one method in this process; returns median ms, loss value and peak memory (MiB)."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    students = [torch.randn(2, 256, h, w, generator=gen).to(device) for h, w in LEVELS]
    teachers = [torch.randn(2, 256, h, w, generator=gen).to(device) for h, w in LEVELS]
    for s in students:
        s.requires_grad_(True)
    fn = _build(method)
    cuda = device.startswith("cuda")

    def step() -> float:
        loss = sum(fn(s, t) for s, t in zip(students, teachers, strict=True))
        loss.backward()
        for s in students:
            s.grad = None
        return float(loss)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS")
    value = step()  # warm-up
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_rss_kib("VmHWM") - base) / 1024
    return {"method": method, "ms": statistics.median(times), "loss": value, "peak_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.reps, args.threads)))
        return
    rows = []
    for m in args.methods:
        cmd = [sys.executable, __file__, "--one", m, "--device", args.device,
               "--reps", str(args.reps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            print(f"{m}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = {r["method"]: r for r in rows}
    base = ref.get("pytorch-msssim")
    print(f"device={args.device} threads={args.threads} reps={args.reps} "
          f"levels={LEVELS} batch=2 channels=256")
    print(f"| {'method':<22} | {'median ms':>9} | {'vs msssim':>9} | {'peak MiB':>8} | "
          f"{'loss':>10} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 12}|")
    for r in rows:
        ratio = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        r["speedup_vs_msssim"] = base["ms"] / r["ms"] if base else None
        print(f"| {r['method']:<22} | {r['ms']:>9.1f} | {ratio:>9} | {r['peak_mib']:>8.0f} | "
              f"{r['loss']:>10.6f} |")
    if args.json:
        meta = {"device": args.device, "threads": args.threads, "reps": args.reps,
                "machine": platform.processor() or platform.machine(), "levels": LEVELS}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
