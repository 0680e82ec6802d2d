"""Thread sizing from the affinity and the cgroup quota (faked cgroup files), and the OpenMP
wait policy structkd sets before torch loads."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from structkd import _openmp as structkd_openmp
from structkd.cpu import cgroup_cpu_limit, configure_threads, cpu_budget


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_own_cgroup(tmp_path: Path) -> None:
    _write(tmp_path / "proc_cgroup", "0::/docker/abc\n")
    _write(tmp_path / "fs" / "cpu.max", "max 100000\n")
    _write(tmp_path / "fs" / "docker" / "abc" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "proc_cgroup") == 1.5
    assert cpu_budget(8, root=tmp_path / "fs", self_cgroup=tmp_path / "proc_cgroup") == (
        1, "8 cores in this process's affinity, cgroup quota 1.5 CPUs")


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    _write(tmp_path / "proc_cgroup", "4:cpu,cpuacct:/\n3:memory:/x\n")
    _write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us", "300000\n")
    _write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "proc_cgroup") == 3.0
    assert cpu_budget(16, root=tmp_path / "fs", self_cgroup=tmp_path / "proc_cgroup")[0] == 3
    assert cpu_budget(2, root=tmp_path / "fs", self_cgroup=tmp_path / "proc_cgroup")[0] == 2
    _write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "proc_cgroup") is None
    assert cpu_budget(4, root=tmp_path / "fs", self_cgroup=tmp_path / "proc_cgroup") == (
        4, "4 cores in this process's affinity, no cgroup CPU quota")
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "no_file") is None


def test_a_quota_below_one_cpu_still_gives_one_thread() -> None:
    assert cpu_budget(4, quota=0.5)[0] == 1


def test_configure_threads_sets_and_says_it_once(caplog) -> None:
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="structkd.cpu"):
            assert configure_threads(1) == 1
            assert torch.get_num_threads() == 1
            configure_threads(1)
        said = [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()]
        assert len(said) <= 1  # once per count in a process (an earlier test may have said it)
        assert configure_threads() == len(os.sched_getaffinity(0))  # no quota on CI machines
    finally:
        torch.set_num_threads(before)


OPENMP = Path(structkd_openmp.__file__)


@pytest.mark.parametrize(("env", "torch_first", "expected"), [
    ({}, False, ["PASSIVE", "False"]),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, False, ["ACTIVE", "False"]),  # the user's own is kept
    ({}, True, ["None", "True"]),  # too late to matter: left alone (the run's log says so)
])
def test_the_wait_policy_is_set_before_torch_loads(env, torch_first, expected) -> None:
    """``structkd/_openmp.py`` run as structkd runs it (in a fresh interpreter)."""
    code = ("import sys, os, runpy\n" + ("import torch\n" if torch_first else "")
            + f"g = runpy.run_path({str(OPENMP)!r})\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), g['TORCH_LOADED_FIRST'])")
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == expected


def test_structkd_loads_its_openmp_settings_before_anything_else() -> None:
    """The first import of the package is ``_openmp`` (every other one may load torch)."""
    import ast

    tree = ast.parse(Path(structkd_openmp.__file__).with_name("__init__.py").read_text())
    first = next(n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom))
    assert isinstance(first, ast.ImportFrom) and [a.name for a in first.names] == ["_openmp"]
