"""CPU threads that fit the machine: the cores this process may run on (its affinity) and its
cgroup CPU quota (a container's ``--cpus``), not the host's core count, which torch's default
follows. A run with more threads than its quota allows is throttled every scheduling period."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "configure_threads", "cpu_budget"]

log = logging.getLogger(__name__)
_said: set[int] = set()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup",
                     self_cgroup: str | os.PathLike = "/proc/self/cgroup") -> float | None:
    """The CPUs the process's cgroup quota allows (``quota / period``; 1.5 for
    ``--cpus=1.5``), the smallest over cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us``),
    at the process's own cgroup and at the root; None without a quota."""
    root = Path(root)
    paths = {""}
    for line in (_read(Path(self_cgroup)) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "" or "cpu" in parts[1].split(",")):
            paths.add(parts[2].strip("/"))
    limits = []
    for sub in paths:
        v2 = _read(root / sub / "cpu.max")
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                limits.append(int(quota) / int(period))
        for v1 in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            quota = _read(root / v1 / sub / "cpu.cfs_quota_us")
            period = _read(root / v1 / sub / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0:
                limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def cpu_budget(affinity: int | None = None, quota: float | None = None, **where) -> tuple[int, str]:
    """The threads a run should use, and why: the cores in its affinity, capped by its cgroup
    quota rounded down (at least one)."""
    cores = len(os.sched_getaffinity(0)) if affinity is None else affinity
    limit = cgroup_cpu_limit(**where) if quota is None else quota
    if limit is not None and math.floor(limit) < cores:
        return max(1, math.floor(limit)), (f"{cores} cores in this process's affinity, cgroup "
                                           f"quota {limit:g} CPUs")
    quota_text = "no cgroup CPU quota" if limit is None else f"cgroup quota {limit:g} CPUs"
    return cores, f"{cores} cores in this process's affinity, {quota_text}"


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (``trainer.threads``) or, by default, to
    :func:`cpu_budget`; said once per count in the log."""
    import torch

    if threads:
        n, why = threads, "trainer.threads"
    else:
        n, why = cpu_budget()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if n not in _said:
        _said.add(n)
        from . import _openmp

        wait = os.environ.get("OMP_WAIT_POLICY") or "GNU OpenMP's default (spin, then sleep)"
        late = " (torch was imported before structkd: set OMP_WAIT_POLICY=PASSIVE yourself)" \
            if _openmp.TORCH_LOADED_FIRST and "OMP_WAIT_POLICY" not in os.environ else ""
        log.info("CPU threads: %d (%s); OpenMP wait policy %s%s", n, why, wait, late)
    return n
