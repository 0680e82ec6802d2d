"""The run folder: one run at a time (a lock), a finished run never overwritten, a dead run's
lock taken over, unwritable places refused before any work."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from kdtest import SRC, tiny_overrides
from structkd.engine.runs.run_dir import LOCK_NAME, RUN_DIR_ENV, claim_out_dir


def test_a_folder_held_by_a_live_run_is_never_shared(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    out.mkdir()
    held = FileLock(out / LOCK_NAME)
    held.acquire()  # another process's run (a FileLock in this process stands in for it)
    try:
        with caplog.at_level("WARNING", logger="structkd.engine"):
            claimed = claim_out_dir(out, resume=False, overwrite=False)
        assert claimed.path == tmp_path / "run-2"
        assert "is being written by another run; this one goes to" in caplog.text
        claimed.release()
        with pytest.raises(ValueError, match=r"cannot resume .*run: another run is writing"):
            claim_out_dir(out, resume=True, overwrite=False)
        with pytest.raises(ValueError):  # overwrite never replaces a live run's folder either
            claim_out_dir(out, resume=True, overwrite=True)
    finally:
        held.release()
    assert claim_out_dir(out, resume=False, overwrite=False).path == out  # free again


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 999999 on some-host")  # written, never unlocked
    (out / "metrics.csv").write_text("step\n")  # the dead run's files
    with caplog.at_level("WARNING", logger="structkd.engine"):
        claimed = claim_out_dir(out, resume=True, overwrite=False)
    assert claimed.path == out
    assert "taking over the folder from pid 999999 on some-host" in caplog.text
    assert (out / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    claimed.release()
    assert (out / LOCK_NAME).read_text() == ""  # released: no owner left behind
    assert RUN_DIR_ENV not in os.environ


def test_a_folder_the_claim_made_and_nothing_filled_is_removed(tmp_path: Path) -> None:
    claimed = claim_out_dir(tmp_path / "run", resume=False, overwrite=False)
    assert (tmp_path / "run" / LOCK_NAME).is_file()
    claimed.release()  # the run failed before writing anything
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"trainer.out_dir=.*cannot write into"):
            claim_out_dir(ro / "run", resume=False, overwrite=False)
    finally:
        ro.chmod(0o755)


def test_a_read_only_file_system_is_refused(tmp_path: Path, monkeypatch) -> None:
    """As root (this machine's tests), a mode bit does not stop a write; a read-only file
    system does: stand in for one by failing the probe write the way the kernel would."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"cannot write into .* \(Read-only file system\)"):
        claim_out_dir(tmp_path / "run", resume=False, overwrite=False)


def test_two_runs_started_together_write_two_folders(coco_data, tmp_path: Path) -> None:
    """Two `structkd train` processes into the same new folder: each run is whole, in its own
    folder (one in OUT, one in OUT-2), every step logged once."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    args = [sys.executable, "-m", "structkd.cli", "train",
            *[a for o in tiny_overrides(coco_data, out, "schedule.max_steps=null",
                                        "schedule.epochs=3", "trainer.log_every=1")
              for a in ("--set", o)]]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    for folder in (out, tmp_path / "run-2"):
        assert (folder / "results.json").is_file()
        with (folder / "metrics.csv").open(newline="") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
        assert steps == list(range(6))  # 3 epochs of 2 steps, each once
