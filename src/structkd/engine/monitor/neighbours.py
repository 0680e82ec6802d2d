"""Whether other processes take this machine's CPUs from a CPU run: said once, with the share
they took and how much slower the steps ran, instead of a run that silently crawls.

Every ``every`` steps it reads the machine's busy CPU time (``/proc/stat``) and that of the run's
own process tree (``/proc/<pid>/stat`` of the process and its descendants: loader workers, DDP
ranks), and attributes the rest to other processes. When they took at least ``threshold`` CPUs
while the run could have used them (its threads plus theirs exceed the CPUs it may run on), it
logs one warning naming both shares and the window's step time against the quietest window's.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L

logger = logging.getLogger("structkd.engine")

__all__ = ["CpuNeighbours", "CpuSample", "cpu_sample", "others_cpus"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    """Busy CPU seconds of the machine and of the run's process tree, at a wall-clock time."""

    wall: float
    machine: float
    own: float


def _machine_busy(stat: Path) -> float:
    # cpu  user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICK


def _process_table(proc: Path) -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, its CPU seconds, user + system)."""
    table = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        rest = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        # rest[0] state, [1] ppid, ..., [11] utime, [12] stime
        table[int(entry.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK)
    return table


def cpu_sample(pid: int | None = None, proc: str | os.PathLike = "/proc",
               wall: float | None = None) -> CpuSample:
    """The machine's and the process tree of ``pid``'s busy CPU seconds now."""
    proc = Path(proc)
    pid = os.getpid() if pid is None else pid
    table = _process_table(proc)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    own = sum(table[p][1] for p in tree if p in table)
    return CpuSample(time.monotonic() if wall is None else wall, _machine_busy(proc / "stat"),
                     own)


def others_cpus(before: CpuSample, after: CpuSample) -> tuple[float, float]:
    """CPUs the other processes and the run itself used on average between two samples."""
    span = after.wall - before.wall
    if span <= 0:
        return 0.0, 0.0
    own = (after.own - before.own) / span
    machine = (after.machine - before.machine) / span
    return max(0.0, machine - own), own


class CpuNeighbours(L.Callback):
    """A CPU run's watch for other processes on its CPUs (one job: say it once)."""

    def __init__(self, threads: int, cpus: int | None = None, *, every: int = 50,
                 threshold: float = 0.5, proc: str | os.PathLike = "/proc") -> None:
        self.threads, self.every, self.threshold = threads, every, threshold
        self.cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
        self.proc = Path(proc)
        self._last: CpuSample | None = None
        self._steps_at_last = 0
        self._quietest: float | None = None  # seconds per step of the quietest window
        self.said: str | None = None

    def _sample(self) -> CpuSample | None:
        try:
            return cpu_sample(proc=self.proc)
        except (OSError, ValueError, IndexError):  # no /proc here (macOS, Windows)
            return None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:  # rank 0's process tree holds the other ranks
            return
        self.threads *= trainer.world_size
        self._last, self._steps_at_last = self._sample(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        steps = trainer.global_step - self._steps_at_last
        if self.said is not None or self._last is None or steps < self.every:
            return
        now = self._sample()
        if now is None:
            return
        others, own = others_cpus(self._last, now)
        per_step = (now.wall - self._last.wall) / steps
        self._last, self._steps_at_last = now, trainer.global_step
        if others < self.threshold or others + self.threads <= self.cpus:
            self._quietest = per_step if self._quietest is None else min(self._quietest,
                                                                          per_step)
            return
        slower = (f"{per_step:.2f} s per step, {per_step / self._quietest:.1f}x the quietest "
                  f"{self.every} steps' {self._quietest:.2f} s" if self._quietest else
                  f"{per_step:.2f} s per step (no quiet window yet to compare with)")
        self.said = (f"other processes used {others:.1f} of the {self.cpus} CPUs this run may "
                     f"use over the last {steps} steps (this run: {own:.1f}, {self.threads} "
                     f"threads): {slower}. A shared machine slows a CPU run; see "
                     "docs/speed.md, 'Beside another program'")
        logger.warning(self.said)
