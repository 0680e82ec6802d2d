"""``structkd demo`` (``structkd.apps.demo``): the smoke run ``demo --quick`` once, in a fresh
interpreter (its console is checked); a second demo into the same folder reuses the cached
teacher and keeps the first (with students of 2 steps here, the whole ``--quick`` students in
the slow suite)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import pytest

from kdtest import cli_inprocess, cli_subprocess


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """``structkd demo --quick`` run once: (its folder, its cache, the process)."""
    tmp = tmp_path_factory.mktemp("demo")
    out, cache = tmp / "demo", tmp / "cache"
    proc = cli_subprocess(["demo", "--quick", "--out", str(out), "--cache", str(cache)],
                          timeout=900)
    return out, cache, proc


def test_demo_quick(quick_demo) -> None:
    """The demo's smoke run: teacher, three students, table, report, JSON and plots."""
    out, _, proc = quick_demo
    stdout = _ok(proc)
    for name in ("teacher", "student-none", "student-mse", "student-ssim"):
        assert f"| {name} |" in stdout
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "student-none", "student-mse",
                                         "student-ssim"]
    keys = {"name", "method", "AP", "AP50", "AP75", "APs", "APm", "APl", "params", "latency_ms",
            "onnx_ms"}
    assert all(keys <= set(r) for r in rows)
    assert all(r["latency_ms"] > 0 and r["onnx_ms"] > 0 for r in rows)
    for png in ("ap_per_method.png", "curves.png", "detections.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert report.startswith("# structkd demo") and "![detections](detections.png)" in report
    assert "Size gap: student" in stdout
    assert (out / "student.onnx").is_file() and (out / "teacher.onnx").is_file()
    # The table and the paths of the report and figures are the last lines printed.
    lines = stdout.strip().splitlines()
    at = lines.index(f"report: {out / 'report.md'}")
    figures = [Path(line.removeprefix("figure: ")) for line in lines[at + 1:]]
    assert all(line.startswith("figure: ") for line in lines[at + 1:]) and len(figures) >= 3
    assert all(f.is_file() for f in figures)
    # A clean console: no Lightning advert, no log message printed twice in a row, no
    # Lightning information lines or known harmless warnings between the demo's own lines.
    log = [ln for ln in proc.stderr.splitlines() if ln.startswith(("INFO", "WARNING"))]
    assert "litlogger" not in proc.stderr.lower() and "Tip:" not in proc.stderr
    assert not [a for a, b in itertools.pairwise(log) if a == b]
    assert "LeafSpec" not in proc.stderr and "exists and is not empty" not in proc.stderr
    assert not [ln for ln in log if "lightning" in ln]


def _check_second_demo(proc, out: Path, cache: Path, first: bytes,
                       steps: int | None = None) -> None:
    """A second demo into ``out``: the cached teacher reused, the first demo's results kept
    byte for byte, its own students in ``OUT-2`` with each row read from its run (of ``steps``
    steps, where given)."""
    _ok(proc)
    assert "reusing the cached teacher" in proc.stderr
    assert len(list((cache / "teachers").iterdir())) == 1
    second = out.parent / "demo-2"
    assert f"this one goes to {second}" in proc.stderr
    assert (out / "results.json").read_bytes() == first
    rows2 = json.loads((second / "results.json").read_text())
    for r in rows2[1:]:
        run = json.loads((second / r["method"] / "results.json").read_text())
        assert r["AP"] == run["metrics"]["AP"] and r["params"] == run["params"]
        assert run["out_dir"] == str(second / r["method"])
        if steps is not None:
            assert run["steps"] == steps
    assert f"report: {second / 'report.md'}" in proc.stdout
    assert not list(out.glob("*-2"))  # no run of the second demo went into the first


def test_a_second_demo_reuses_the_teacher_and_keeps_the_first(quick_demo, tmp_path: Path,
                                                              monkeypatch) -> None:
    """The second demo of ``test_demo_quick_again`` (slow) with its students cut to 2 steps, in
    this interpreter, into a copy of the first demo's folder (the cache is shared: the teacher
    is reused, never written)."""
    from structkd.apps import demo as demo_mod
    from structkd.apps.plan import QUICK_PLAN

    first_out, cache, proc = quick_demo
    _ok(proc)
    out = shutil.copytree(first_out, tmp_path / "demo")
    student = {**QUICK_PLAN.student,
               "schedule": {**QUICK_PLAN.student["schedule"], "max_steps": 2}}
    monkeypatch.setattr(demo_mod, "get_plan",
                        lambda quick: dataclasses.replace(QUICK_PLAN, student=student))
    first = (out / "results.json").read_bytes()
    proc = cli_inprocess(["demo", "--quick", "--out", str(out), "--cache", str(cache),
                          "--seed", "1"])
    _check_second_demo(proc, out, cache, first, steps=2)


@pytest.mark.slow  # test_a_second_demo_reuses_the_teacher_and_keeps_the_first in the fast suite
def test_demo_quick_again(quick_demo) -> None:
    """A second demo into the same folder reuses the cached teacher, keeps the first demo and
    reports its own students (another seed), read from the folder it wrote them to. (Last in
    this file: it writes beside the shared first demo.)"""
    out, cache, _ = quick_demo
    first = (out / "results.json").read_bytes()
    proc = cli_subprocess(["demo", "--quick", "--out", str(out), "--cache", str(cache),
                           "--seed", "1"], timeout=900)
    _check_second_demo(proc, out, cache, first)
