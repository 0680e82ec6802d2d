"""OpenMP threads that sleep when they wait, set before torch loads its thread pool.

GNU OpenMP (torch's CPU thread pool) lets a thread that waits for the others spin for about
300k iterations before it sleeps. On a machine where another process holds a core, the
spinning threads take the time the working thread needs, and structkd's many short parallel
regions (the fused SSIM chunks) slowed by about 20x beside one busy neighbour
(``benchmarks/busy_neighbour.py``). ``OMP_WAIT_POLICY=PASSIVE`` makes a waiting thread sleep.
OpenMP reads it once, when torch loads: structkd sets it when it is imported before torch, and
leaves any value the environment gives alone.
"""

from __future__ import annotations

import os
import sys

# Whether torch was loaded before structkd (then its OpenMP runtime has read its settings).
TORCH_LOADED_FIRST = "torch" in sys.modules

if not TORCH_LOADED_FIRST:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
