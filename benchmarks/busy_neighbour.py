"""The SSIM loss on a machine that is not quiet: quiet, then beside one busy neighbour, in one run.

A neighbour is one single-threaded Python process spinning in its own session (as any other
program a user runs is: ``nice`` does not shield a run, each session gets its share). Each
measurement runs in a fresh process, because OpenMP reads its wait policy when torch loads:

* ``default``: the wait policy structkd sets before torch loads (``OMP_WAIT_POLICY=PASSIVE``:
  a thread that waits for the others sleeps instead of spinning);
* ``spinning``: GNU OpenMP's own default (threads spin ~300k iterations before sleeping), as
  structkd ran before, and as it runs when torch was imported before structkd.

Timed: the forward+backward of ``loss_speed.py``'s bar (five RetinaNet levels of an 800x1333
image, batch 2, 256 channels), structkd's SSIM and pytorch-msssim interleaved round by round
(median), ``--threads`` torch threads. The table gives each time, the slowdown under the
neighbour, and structkd's speed relative to pytorch-msssim.

    python benchmarks/busy_neighbour.py                       # table
    python benchmarks/busy_neighbour.py --json out.json       # and JSON
    python benchmarks/busy_neighbour.py --rounds 3 --policies default
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
METHODS = ["structkd-ssim", "pytorch-msssim"]
# name -> (environment, torch imported before structkd)
POLICIES = {
    "structkd": ({}, False),  # structkd's own choice, set when it loads before torch
    "gnu-default": ({}, True),  # GNU OpenMP's default: torch loaded first, nothing set
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, True),
    "spin-10k": ({"GOMP_SPINCOUNT": "10000"}, True),
    "spin-100k": ({"GOMP_SPINCOUNT": "100000"}, True),
}
DEFAULT_POLICIES = ["structkd", "gnu-default"]


def _child(rounds: int, threads: int, torch_first: bool) -> None:
    """Runs in a fresh process: import structkd (before torch it sets the wait policy unless
    the environment sets one), then time the methods; prints one JSON line."""
    if torch_first:
        import torch  # noqa: F401
    import structkd  # noqa: F401

    sys.path.insert(0, str(HERE))
    from loss_speed import time_methods

    rows = time_methods(METHODS, "cpu", rounds, threads)
    settings = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                        if k in os.environ) or "-"
    print(json.dumps({"rows": rows, "settings": settings}))


def _measure(policy: str, rounds: int, threads: int) -> dict:
    extra, torch_first = POLICIES[policy]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra)
    proc = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(rounds),
                           "--threads", str(threads), *(["--torch-first"] if torch_first else [])],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the timing process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _neighbour() -> subprocess.Popen:
    """One busy single-threaded process in its own session."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)


def run(policies: list[str], rounds: int, threads: int) -> list[dict]:
    out = []
    for policy in policies:
        for condition in ("quiet", "loaded"):
            neighbour = _neighbour() if condition == "loaded" else None
            try:
                if neighbour is not None:
                    time.sleep(1.0)  # the neighbour is running before the timing starts
                result = _measure(policy, rounds, threads)
            finally:
                if neighbour is not None:
                    os.killpg(neighbour.pid, signal.SIGKILL)
                    neighbour.wait()
            ms = {r["method"]: r["ms"] for r in result["rows"]}
            out.append({"policy": policy, "condition": condition,
                        "settings": result["settings"], **{
                            f"{m}_ms": ms[m] for m in METHODS}})
    for row in out:
        quiet = next(r for r in out if r["policy"] == row["policy"] and r["condition"] == "quiet")
        row["slowdown"] = row["structkd-ssim_ms"] / quiet["structkd-ssim_ms"]
        row["msssim_slowdown"] = row["pytorch-msssim_ms"] / quiet["pytorch-msssim_ms"]
        row["speed_vs_msssim"] = row["pytorch-msssim_ms"] / row["structkd-ssim_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="timed steps per method and condition")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), default=DEFAULT_POLICIES)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-first", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.rounds, args.threads, args.torch_first)
        return
    rows = run(args.policies, args.rounds, args.threads)
    print(f"SSIM loss fwd+bwd (loss_speed.py's bar), {args.threads} threads, median of "
          f"{args.rounds} rounds; loaded = beside one busy single-threaded process\n")
    print("| policy | settings | condition | structkd SSIM ms | pytorch-msssim ms | "
          "structkd slowdown | msssim slowdown | structkd vs msssim |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['settings']} | {r['condition']} | "
              f"{r['structkd-ssim_ms']:.1f} | {r['pytorch-msssim_ms']:.1f} | "
              f"{r['slowdown']:.2f}x | {r['msssim_slowdown']:.2f}x | "
              f"{r['speed_vs_msssim']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/busy_neighbour.py " + " ".join(sys.argv[1:]),
            "machine": {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                        "platform": platform.platform()},
            "rows": rows}, indent=2))
        print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
