"""The SSIM loss on a machine that is not quiet: quiet, then beside one busy neighbour, in one run.

A neighbour is one single-threaded Python process spinning in its own session (as any other
program a user runs is: ``nice`` does not shield a run, each session gets its share). Each
measurement runs in a fresh process, because OpenMP reads its wait policy when torch loads:

* ``default``: the wait policy structkd sets before torch loads (``OMP_WAIT_POLICY=PASSIVE``:
  a thread that waits for the others sleeps instead of spinning);
* ``spinning``: GNU OpenMP's own default (threads spin ~300k iterations before sleeping), as
  structkd ran before, and as it runs when torch was imported before structkd.

Timed (``--what``): ``loss``, the forward+backward of ``loss_speed.py``'s bar (five RetinaNet
levels of an 800x1333 image, batch 2, 256 channels), structkd's SSIM and pytorch-msssim
interleaved round by round (median); ``step``, a whole SSIM distillation training step of
``step_overhead.py``'s pair (RetinaNet ResNet-18 student, ResNet-50 teacher) at 128 px, batch 2,
FPN 128 (median after one warm-up step); ``--threads`` torch threads. The table gives each time,
the slowdown under the neighbour, and (loss) structkd's speed relative to pytorch-msssim.

    python benchmarks/busy_neighbour.py                       # table
    python benchmarks/busy_neighbour.py --json out.json       # and JSON
    python benchmarks/busy_neighbour.py --what step --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = {"loss": ["structkd-ssim", "pytorch-msssim"], "step": ["ssim-step"]}
# name -> (environment, torch imported before structkd)
POLICIES = {
    "structkd": ({}, False),  # structkd's own choice, set when it loads before torch
    "gnu-default": ({}, True),  # GNU OpenMP's default: torch loaded first, nothing set
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, True),
    "spin-1k": ({"GOMP_SPINCOUNT": "1000"}, True),
    "spin-10k": ({"GOMP_SPINCOUNT": "10000"}, True),
    "spin-100k": ({"GOMP_SPINCOUNT": "100000"}, True),
}
DEFAULT_POLICIES = ["structkd", "gnu-default"]


def _step_rows(rounds: int, threads: int) -> list[dict]:
    from types import SimpleNamespace

    import torch

    from common import random_batch, train_step
    from step_overhead import build
    from structkd.timing import interleaved

    torch.set_num_threads(threads)
    args = SimpleNamespace(fpn=128, size=128, batch=2, student="resnet18", teacher="resnet50",
                           device="cpu")
    net, opt = build("ssim", args)
    batches = [random_batch(args.batch, args.size, s) for s in range(2)]
    times = interleaved({"ssim-step": train_step(net, opt, batches)}, rounds=rounds, warmup=1)
    return [{"method": "ssim-step", "ms": times["ssim-step"].median_ms}]


def _child(what: str, rounds: int, threads: int, torch_first: bool) -> None:
    """Runs in a fresh process: import structkd (before torch it sets the wait policy unless
    the environment sets one), then time the methods; prints one JSON line."""
    if torch_first:
        import torch  # noqa: F401
    import structkd  # noqa: F401

    sys.path.insert(0, str(HERE))
    if what == "step":
        rows = _step_rows(rounds, threads)
    else:
        from loss_speed import time_methods

        rows = time_methods(METHODS["loss"], "cpu", rounds, threads)
    settings = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                        if k in os.environ) or "-"
    print(json.dumps({"rows": rows, "settings": settings}))


def _measure(what: str, policy: str, rounds: int, threads: int) -> dict:
    extra, torch_first = POLICIES[policy]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra)
    proc = subprocess.run([sys.executable, __file__, "--child", "--what", what, "--rounds",
                           str(rounds),
                           "--threads", str(threads), *(["--torch-first"] if torch_first else [])],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the timing process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _neighbour() -> subprocess.Popen:
    """One busy single-threaded process in its own session."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)


def run(what: str, policies: list[str], rounds: int, threads: int) -> list[dict]:
    out = []
    for policy in policies:
        for condition in ("quiet", "loaded"):
            neighbour = _neighbour() if condition == "loaded" else None
            try:
                if neighbour is not None:
                    time.sleep(1.0)  # the neighbour is running before the timing starts
                result = _measure(what, policy, rounds, threads)
            finally:
                if neighbour is not None:
                    os.killpg(neighbour.pid, signal.SIGKILL)
                    neighbour.wait()
            ms = {r["method"]: r["ms"] for r in result["rows"]}
            out.append({"policy": policy, "condition": condition,
                        "settings": result["settings"], **{
                            f"{m}_ms": ms[m] for m in METHODS[what]}})
    for row in out:
        quiet = next(r for r in out if r["policy"] == row["policy"] and r["condition"] == "quiet")
        for m in METHODS[what]:
            row[f"{m}_slowdown"] = row[f"{m}_ms"] / quiet[f"{m}_ms"]
        if what == "loss":
            row["speed_vs_msssim"] = row["pytorch-msssim_ms"] / row["structkd-ssim_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--what", choices=list(METHODS), default="loss",
                   help="loss: the SSIM loss beside pytorch-msssim; step: a distillation step")
    p.add_argument("--rounds", type=int, default=7, help="timed steps per method and condition")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), default=DEFAULT_POLICIES)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-first", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.what, args.rounds, args.threads, args.torch_first)
        return
    rows = run(args.what, args.policies, args.rounds, args.threads)
    methods = METHODS[args.what]
    print(f"{args.what}: {args.threads} threads, median of {args.rounds} rounds; loaded = beside "
          "one busy single-threaded process\n")
    extra = " structkd vs msssim |" if args.what == "loss" else ""
    print("| policy | settings | condition |" + "".join(f" {m} ms |" for m in methods)
          + "".join(f" {m} slowdown |" for m in methods) + extra)
    print("|---|---|---|" + "---:|" * (2 * len(methods) + (1 if extra else 0)))
    for r in rows:
        cells = [f"{r[f'{m}_ms']:.1f}" for m in methods]
        cells += [f"{r[f'{m}_slowdown']:.2f}x" for m in methods]
        if extra:
            cells.append(f"{r['speed_vs_msssim']:.2f}x")
        print(f"| {r['policy']} | {r['settings']} | {r['condition']} | " + " | ".join(cells)
              + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/busy_neighbour.py " + " ".join(sys.argv[1:]),
            "what": args.what,
            "machine": {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                        "platform": platform.platform()},
            "rows": rows}, indent=2))
        print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
