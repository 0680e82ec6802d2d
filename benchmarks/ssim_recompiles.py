"""How often the compiled SSIM path compiles again when the level size changes.

SSIM forward + backward (``structkd.losses.SSIMLoss``, compiled kernels on, float32 CPU) on one
(2, 256, H, W) level per row, the sizes in the order given; per row: the new torch.compile
graphs the first call made (dynamo's ``unique_graphs`` counter) and the seconds of that first
call and of a second one. Sizes that keep the chunk width the path chose reuse the compiled
code; a size that changes it compiles anew.

    python benchmarks/ssim_recompiles.py                       # table
    python benchmarks/ssim_recompiles.py --json out.json       # and JSON
    python benchmarks/ssim_recompiles.py --sizes 100x168 50x84
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DEFAULT_SIZES = ["100x168", "96x160", "104x176", "100x168", "50x84", "200x336"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, metavar="HxW")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args()

    from torch._dynamo.utils import counters

    from structkd.losses import SSIMLoss
    from structkd.losses.ssim import set_compile

    torch.set_num_threads(args.threads)
    set_compile(True)
    loss = SSIMLoss()
    rows = []
    print("| level (H x W) | new graphs | first call s | second call s |")
    print("|---|---:|---:|---:|")
    for text in args.sizes:
        h, w = (int(v) for v in text.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        x = torch.rand(2, args.channels, h, w, generator=g, requires_grad=True)
        y = torch.rand(2, args.channels, h, w, generator=g)
        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        loss(x, y).backward()
        first = time.perf_counter() - start
        new = counters["stats"]["unique_graphs"] - before
        start = time.perf_counter()
        loss(x, y).backward()
        second = time.perf_counter() - start
        rows.append({"size": [h, w], "new_graphs": new, "first_s": first, "second_s": second})
        print(f"| {h} x {w} | {new} | {first:.1f} | {second:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"channels": args.channels, "threads": args.threads,
                       "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
