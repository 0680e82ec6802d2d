"""Forward+backward time and peak memory of feature-distillation losses on RetinaNet FPN levels.

Inputs: the five RetinaNet neck levels of an 800x1333 image (P3 100x168 ... P7 7x11), batch 2,
256 channels; the loss is min-max normalisation + distance + mean, summed over levels, with the
gradient taken w.r.t. the student (the teacher needs none).

The ``method-*`` rows are whole distillation methods built by ``structkd.methods.build_method``
for the five levels (``Level`` objects, one ``DistillContext`` per step, default options and
presets): their trainable parts (MGD's generators, FGD's GcBlocks) are in the timing and receive
gradients too; FGD gets four random ground-truth boxes per image. ``method-ssim`` is SSIM through
the same API (adapter "auto": none at equal widths; weight 1), beside the bare ``structkd-ssim``
loss, whose value it must equal.
``fussim`` (a CUDA SSIM) is a row only where it is importable and the device is CUDA.

Timing: all methods run in one process, interleaved round by round, so that the slow drifts of a
shared machine hit every method alike; the table gives the median over rounds. Peak memory: each
method once in its own subprocess (resident-set high-water mark on CPU, max allocated on CUDA).
"Numerics": the loss on P3-P6 minus pytorch-msssim's; P7 is left out of that check because it
is smaller than the 11x11 window there, where pytorch-msssim skips the blur along the short
dimension and structkd truncates the window (see ``structkd.losses.ssim``).

    python benchmarks/loss_speed.py                    # table
    python benchmarks/loss_speed.py --json out.json    # and JSON
    python benchmarks/loss_speed.py --device cuda      # on a GPU (synchronised timings)
    python benchmarks/loss_speed.py --rounds 2 --methods structkd-ssim method-pkd method-fgd
    python benchmarks/loss_speed.py --ssim-compile     # SSIM's compiled kernels

``--ssim-compile`` turns on ``structkd.losses.ssim.set_compile`` (float32 CPU): the timed
rounds are steady state (the untimed warm-up step compiles), and the warm-up time, compilation
included, is printed under the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import warnings

LEVELS = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
BATCH_SHAPE = (800, 1344)  # the padded batch of an 800x1333 image (size divisor 32)
IMAGE_SIZE = (800, 1333)
BOXES_PER_IMAGE = 4
METHODS = {
    "structkd-ssim": "structkd SSIMLoss (same/reflect, the default)",
    "structkd-ssim-valid": "structkd SSIMLoss (valid, pytorch-msssim's numerics)",
    "structkd-mse": "structkd MSELoss (min-max)",
    "torch-mse": "F.mse_loss, no normalisation",
    "pytorch-msssim": "pytorch_msssim.ssim (valid), autograd min-max",
    "kornia": "kornia ssim_loss (reflect), autograd min-max",
    "fussim": "fussim fused_ssim (valid, CUDA only), autograd min-max",
    "method-ssim": "build_method('ssim', adapter='auto', weight=1): SSIM through the method API",
    "method-pkd": "build_method('pkd'): PKD, RetinaNet preset",
    "method-cwd": "build_method('cwd'): CWD, tau 1",
    "method-mgd": "build_method('mgd'): MGD, RetinaNet preset, generators trained",
    "method-fgd": "build_method('fgd'): FGD, RetinaNet preset, 4 boxes per image",
}
REFERENCE = "pytorch-msssim"
SSIM_ROW = "structkd-ssim"
# method-ssim: no adapter and weight 1, so that it differs from structkd-ssim by the API only.
METHOD_OPTIONS = {"ssim": {"adapter": "auto", "weight": 1.0}}


def _fussim_available(device: str) -> bool:
    import importlib.util

    return device.startswith("cuda") and importlib.util.find_spec("fussim") is not None


def default_methods(device: str) -> list[str]:
    """Every row that can run on ``device`` (fussim only where importable, on CUDA)."""
    return [m for m in METHODS if m != "fussim" or _fussim_available(device)]


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

        return {
            "structkd-ssim": SSIMLoss(),
            "structkd-ssim-valid": SSIMLoss(padding="valid"),
            "structkd-mse": MSELoss(),
        }[method]
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
    if method == "fussim":
        from fussim import fused_ssim

        def fussim_loss(s, t):
            z_s, z_t = _autograd_minmax(s), _autograd_minmax(t)
            return (1 - fused_ssim(z_s, z_t, padding="valid")) / 2

        return fussim_loss
    raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")


def _inputs(device: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    students = [torch.randn(2, 256, h, w, generator=gen).to(device) for h, w in LEVELS]
    teachers = [torch.randn(2, 256, h, w, generator=gen).to(device) for h, w in LEVELS]
    for s in students:
        s.requires_grad_(True)
    return students, teachers


def _random_boxes(device: str):
    """``BOXES_PER_IMAGE`` random boxes (x1, y1, x2, y2) inside each image, fixed seed."""
    import torch

    gen = torch.Generator().manual_seed(1)
    h, w = IMAGE_SIZE
    boxes = []
    for _ in range(2):
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
        wh = (0.02 + 0.4 * torch.rand(BOXES_PER_IMAGE, 2, generator=gen)) * torch.tensor([w, h])
        box = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], dim=1)
        boxes.append(box.to(device))
    return boxes


def _method_stepper(method: str, device: str):
    """Like ``_stepper`` for a ``structkd.methods`` method (trainable parts included)."""
    import torch

    from structkd.methods import DistillContext, Level, build_method

    levels = [Level(f"p{i + 3}", 8 * 2**i, 256, 256) for i in range(len(LEVELS))]
    name = method.removeprefix("method-")
    dist = build_method(name, levels, **METHOD_OPTIONS.get(name, {})).to(device)
    students, teachers = _inputs(device)
    ctx = DistillContext(
        student={lv.name: s for lv, s in zip(levels, students, strict=True)},
        teacher={lv.name: t for lv, t in zip(levels, teachers, strict=True)},
        levels={lv.name: lv for lv in levels}, batch_shape=BATCH_SHAPE,
        image_sizes=None, boxes=_random_boxes(device),
    )
    cuda = device.startswith("cuda")

    def step() -> tuple[float, float]:
        terms = dist(ctx)
        loss = sum(terms.values())
        loss.backward()
        for s in students:
            s.grad = None
        for p in dist.parameters():
            p.grad = None
        if cuda:
            torch.cuda.synchronize()
        p3_p6 = dist.weight * sum(float(dist.level_values[lv.name]) for lv in levels[:4])
        return float(loss.detach()), p3_p6

    return step


def _stepper(method: str, device: str):
    """A closure running one forward+backward of ``method``; returns (loss, loss on P3-P6)."""
    import torch

    if method.startswith("method-"):
        return _method_stepper(method, device)
    fn = _build(method)
    students, teachers = _inputs(device)
    cuda = device.startswith("cuda")

    def step() -> tuple[float, float]:
        values = [fn(s, t) for s, t in zip(students, teachers, strict=True)]
        loss = sum(values)
        loss.backward()
        for s in students:
            s.grad = None
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach()), float(sum(v.detach() for v in values[:4]))

    return step


def peak_memory(method: str, device: str) -> dict:
    """One step of ``method`` in this (fresh) process; returns its peak memory in MiB."""
    import torch

    warnings.filterwarnings("ignore")
    cuda = device.startswith("cuda")
    step = _stepper(method, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS")
    step()
    step()
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_rss_kib("VmHWM") - base) / 1024
    return {"method": method, "peak_mib": peak}


def time_methods(methods: list[str], device: str, rounds: int, threads: int) -> list[dict]:
    """Median forward+backward time per method, the methods interleaved round by round."""
    import torch

    from structkd.timing import interleaved

    warnings.filterwarnings("ignore")
    import time

    torch.set_num_threads(threads)
    steps = {m: _stepper(m, device) for m in methods}
    values, warmup_s = {}, {}
    for m in methods:  # warm-up (compilation, where on), and the loss values
        t0 = time.perf_counter()
        values[m] = steps[m]()
        warmup_s[m] = time.perf_counter() - t0
    # The warm-up round is the one above; CUDA is synchronised around every timed step.
    times = interleaved(steps, rounds=rounds, warmup=0, device=device)
    return [
        {"method": m, "ms": times[m].median_ms, "ms_min": times[m].min_ms,
         "loss": values[m][0], "loss_p3_p6": values[m][1], "rounds": rounds,
         "warmup_s": warmup_s[m]}
        for m in methods
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--rounds", type=int, default=9, help="timed steps per method (interleaved)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   help="rows to run (default: all that can run on the device)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--ssim-compile", action="store_true",
                   help="compiled kernels for the SSIM rows (float32 CPU)")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ssim_compile:  # read by losses.ssim.compiled_kernels, here and in the subprocesses
        os.environ["STRUCTKD_SSIM_COMPILE"] = "1"
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args.device)))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: CUDA is not available")
    if args.methods is None:
        args.methods = default_methods(args.device)
    elif "fussim" in args.methods and not _fussim_available(args.device):
        sys.exit("fussim needs the fussim package and --device cuda")
    memory = {}
    for m in args.methods:
        cmd = [sys.executable, __file__, "--memory-of", m, "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{m}: failed\n{out.stderr[-2000:]}")
        memory[m] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    rows = time_methods(args.methods, args.device, args.rounds, args.threads)
    ref = {r["method"]: r for r in rows}.get(REFERENCE)
    ssim = {r["method"]: r for r in rows}.get(SSIM_ROW)
    print(f"device={args.device} threads={args.threads} rounds={args.rounds} "
          f"levels={LEVELS} batch=2 channels=256 ({platform.processor() or platform.machine()})")
    print(f"| {'method':<20} | {'median ms':>9} | {'min ms':>7} | {'vs msssim':>9} | "
          f"{'time/ssim':>9} | {'peak MiB':>8} | {'loss':>10} | {'P3-P6 - msssim':>14} |")
    print(f"|{'-' * 22}|{'-' * 11}:|{'-' * 8}:|{'-' * 10}:|{'-' * 10}:|{'-' * 9}:|{'-' * 11}:|"
          f"{'-' * 15}:|")
    for r in rows:
        r["peak_mib"] = memory[r["method"]]
        r["speedup_vs_msssim"] = ref["ms"] / r["ms"] if ref else None
        r["time_vs_ssim"] = r["ms"] / ssim["ms"] if ssim else None
        diff = r["loss_p3_p6"] - ref["loss_p3_p6"] if ref else float("nan")
        r["numerics_diff_p3_p6"] = diff if r["method"].endswith("ssim-valid") else None
        ratio = f"{r['speedup_vs_msssim']:.2f}x" if ref else "-"
        vs_ssim = f"{r['time_vs_ssim']:.2f}x" if ssim else "-"
        dtxt = f"{diff:+.1e}" if r["numerics_diff_p3_p6"] is not None else ""
        print(f"| {r['method']:<20} | {r['ms']:>9.1f} | {r['ms_min']:>7.1f} | {ratio:>9} | "
              f"{vs_ssim:>9} | {r['peak_mib']:>8.0f} | {r['loss']:>10.6g} | {dtxt:>14} |")
    if args.ssim_compile:
        for r in rows:
            if "ssim" in r["method"] and r["method"] != REFERENCE:
                print(f"{r['method']}: compiled kernels; warm-up step (compilation included) "
                      f"{r['warmup_s']:.1f} s")
    if args.json:
        import torch

        meta = {"device": args.device, "threads": args.threads, "rounds": args.rounds,
                "ssim_compile": args.ssim_compile,
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "torch": torch.__version__, "levels": LEVELS,
                "methods": {m: METHODS[m] for m in args.methods}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
