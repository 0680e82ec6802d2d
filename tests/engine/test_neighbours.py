"""The watch for other processes on a CPU run's CPUs: /proc read right (a faked tree and the
real machine with a busy process beside), said once with the shares and the slowdown."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from structkd.engine.monitor.neighbours import (
    _TICK,
    CpuNeighbours,
    CpuSample,
    cpu_sample,
    others_cpus,
)


def _fake_proc(root: Path, busy_ticks: int, tree: dict[int, tuple[int, int]]) -> Path:
    """``/proc/stat`` with ``busy_ticks`` of user time, and ``pid -> (ppid, ticks)``."""
    root.mkdir(exist_ok=True)
    (root / "stat").write_text(f"cpu  {busy_ticks} 0 0 5000 7 0 0 0 0 0\ncpu0 1 2 3 4\n")
    for pid, (ppid, ticks) in tree.items():
        (root / str(pid)).mkdir(exist_ok=True)
        # comm with a space and a parenthesis, as /proc allows
        (root / str(pid) / "stat").write_text(
            f"{pid} (a (b) c) S {ppid} 0 0 0 -1 0 0 0 0 0 {ticks} {ticks} 0 0 20 0 1 0\n")
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped
    return root


def test_cpu_sample_sums_the_process_tree(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path / "proc", 900,
                      {10: (1, 30), 11: (10, 20), 12: (11, 10), 20: (1, 100), 21: (20, 5)})
    s = cpu_sample(10, proc, wall=3.0)
    assert s == CpuSample(3.0, 900 / _TICK, 2 * (30 + 20 + 10) / _TICK)  # utime + stime


def test_others_cpus() -> None:
    before, after = CpuSample(0.0, 100.0, 40.0), CpuSample(10.0, 130.0, 50.0)
    assert others_cpus(before, after) == pytest.approx((2.0, 1.0))
    assert others_cpus(after, after) == (0.0, 0.0)


def _trainer(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, is_global_zero=True, world_size=1)


def test_said_once_with_the_shares_and_the_slowdown(tmp_path: Path, monkeypatch, caplog) -> None:
    samples = iter([
        CpuSample(0.0, 0.0, 0.0),  # start
        CpuSample(10.0, 20.0, 20.0),  # 10 steps in 10 s, nobody else: the quiet window
        CpuSample(40.0, 80.0, 50.0),  # 10 steps in 30 s: others took 1 CPU of 2
        CpuSample(70.0, 140.0, 80.0),
    ])
    monkeypatch.setattr("structkd.engine.monitor.neighbours.cpu_sample",
                        lambda **_: next(samples))
    watch = CpuNeighbours(threads=2, cpus=2, every=10)
    watch.on_train_start(_trainer(0), None)
    with caplog.at_level(logging.WARNING, logger="structkd.engine"):
        for step in range(1, 41):
            watch.on_train_batch_end(_trainer(step), None, None, None, step)
    said = [r.getMessage() for r in caplog.records]
    assert said == [watch.said]
    assert ("other processes used 1.0 of the 2 CPUs this run may use over the last 10 steps "
            "(this run: 1.0, 2 threads): 3.00 s per step, 3.0x the quietest 10 steps' 1.00 s"
            ) in watch.said


def test_a_neighbour_within_spare_cpus_is_not_said(monkeypatch) -> None:
    samples = iter([CpuSample(0.0, 0.0, 0.0), CpuSample(10.0, 20.0, 10.0)])
    monkeypatch.setattr("structkd.engine.monitor.neighbours.cpu_sample",
                        lambda **_: next(samples))
    watch = CpuNeighbours(threads=1, cpus=2, every=5)  # one thread, one spare CPU: no loss
    watch.on_train_start(_trainer(0), None)
    watch.on_train_batch_end(_trainer(5), None, None, None, 5)
    assert watch.said is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc")
def test_a_busy_child_counts_as_the_runs_own_on_this_machine() -> None:
    """Independent of the arithmetic above, on the real /proc: a spinning child process (as a
    loader worker) is the run's own CPU time, and the machine's busy time includes it."""
    before = cpu_sample()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        time.sleep(1.5)
        after = cpu_sample()
    finally:
        busy.kill()
        busy.wait()
    others, own = others_cpus(before, after)
    assert own >= 0.3, own  # the child spins (about one CPU, less on a loaded machine)
    assert after.machine - before.machine >= after.own - before.own - 0.05
    assert others >= 0 and os.getpid() > 0
