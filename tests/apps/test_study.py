"""``structkd benchmark`` (``structkd.apps.study``): the seed study's smoke run ``benchmark
--quick`` once; run again after an interruption, it reuses every finished run and resumes the
interrupted one (a student here; a student and the teacher in the slow suite)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from kdtest import cli_inprocess


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _args(tmp_path: Path) -> list[str]:
    return ["benchmark", "--quick", "--seeds", "2", "--methods", "none", "ssim", "--out",
            str(tmp_path / "study"), "--cache", str(tmp_path / "cache"), "--results-md",
            str(tmp_path / "RESULTS.md")]


def _benchmark(args: list[str]):
    """``structkd ARGS`` in this interpreter, with ``sys.argv`` as the command line would set
    it (RESULTS.md quotes it) and the thread count restored."""
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["structkd", *args])
            return cli_inprocess(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """``structkd benchmark --quick --seeds 2 --methods none ssim`` run once: (its folder,
    the first RESULTS.md text, the first summary.json)."""
    tmp = tmp_path_factory.mktemp("benchmark")
    proc = _benchmark(_args(tmp))
    _ok(proc)
    text = (tmp / "RESULTS.md").read_text()
    summary = json.loads((tmp / "study" / "summary.json").read_text())
    return tmp, text, summary


def test_benchmark_quick_writes_results_and_resumes(quick_study) -> None:
    """The seed study's smoke run: RESULTS.md with the command, the table and the verdict.
    (Run again it reuses every finished run: the tests below.)"""
    tmp_path, text, _ = quick_study
    assert text.startswith("# Seed study on the built-in dataset")
    assert "Command: `structkd benchmark --seeds 2 --quick`" in text
    assert "| none | - | 2 |" in text and "| ssim | 2 | 2 |" in text
    assert "SSIM - none:" in text and "| teacher |" in text
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["rows"]["ssim"]["n"] == 2 and len(summary["rows"]["ssim"]["AP_runs"]) == 2


def _check_resumed_study(again, quick_study, teacher_line: str) -> None:
    """A second invocation after one interrupted student run: three finished runs reused, the
    student resumed, the teacher as ``teacher_line`` says, the first invocation's numbers."""
    tmp_path, text, summary = quick_study
    _ok(again)
    assert again.stderr.count("reusing the finished run") == 3
    assert "resuming the interrupted run in" in again.stderr
    assert teacher_line in again.stderr
    assert "3 of the 4 student runs were reused" in (tmp_path / "RESULTS.md").read_text()
    assert "were reused" not in text  # the first invocation trained every run
    assert sorted(p.name for p in (tmp_path / "study" / "seed1").iterdir()) == ["none", "ssim"]
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 1
    resumed = json.loads((tmp_path / "study" / "summary.json").read_text())
    for m in ("none", "ssim"):
        assert resumed["rows"][m]["AP_runs"] == summary["rows"][m]["AP_runs"]
    assert resumed["teacher"]["metrics"] == summary["teacher"]["metrics"]


def test_an_interrupted_student_run_is_resumed(quick_study) -> None:
    """Interrupt one student run (as a kill would leave it): run again, the study reuses the
    three finished runs and the cached teacher, resumes the student from its last checkpoint,
    to the same numbers as the uninterrupted first invocation. (The teacher interrupted too:
    ``test_an_interrupted_student_and_teacher_are_resumed``, slow, and
    ``tests/apps/test_plan.py``.)"""
    tmp_path = quick_study[0]
    d = tmp_path / "study" / "seed1" / "ssim"
    (d / "results.json").unlink()
    (d / "student.safetensors").unlink()
    again = _benchmark(_args(tmp_path))
    _check_resumed_study(again, quick_study, "reusing the cached teacher")


@pytest.mark.slow  # test_an_interrupted_student_run_is_resumed and tests/apps/test_plan.py's
# test_an_interrupted_teacher_is_trained_again_in_place in the fast suite
def test_an_interrupted_student_and_teacher_are_resumed(quick_study) -> None:
    """Interrupt one student run and the teacher's training (as a kill would leave them): run
    again, the study reuses the three finished runs, resumes the student from its last
    checkpoint and trains the teacher again in place, to the same numbers as the
    uninterrupted first invocation. (Last in this file: it retrains the shared teacher.)"""
    tmp_path = quick_study[0]
    args = _args(tmp_path)
    for d in (tmp_path / "study" / "seed1" / "ssim", *(tmp_path / "cache" / "teachers").iterdir()):
        (d / "results.json").unlink()
        (d / "student.safetensors").unlink()
    again = _benchmark(args)
    _check_resumed_study(again, quick_study, "holds an interrupted training of this teacher")
