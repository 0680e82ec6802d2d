"""The run directory: claimed by one run at a time, never overwriting a finished run; resumed
into the same files; its CSV log continued."""

from __future__ import annotations

import contextlib
import csv
import itertools
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ...checks import writable_dir

logger = logging.getLogger("structkd.engine")

RUN_MARKERS = ("results.json", "checkpoints", "student.safetensors", "metrics.csv")


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds (part of) a structkd run."""
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


RUN_DIR_ENV = "STRUCTKD_RUN_DIR"  # the folder rank 0 claimed, for the ranks it launches


LOCK_NAME = ".structkd.lock"


@dataclass
class RunDir:
    """The folder a run writes into, held by a lock (``OUT/.structkd.lock``) until
    :meth:`release`: a second run never writes into it at the same time. A folder the claim
    created and the run left empty (it failed before writing anything) is removed again."""

    path: Path
    lock: FileLock | None = None
    created: bool = False

    def release(self) -> None:
        if self.lock is not None and self.lock.is_locked:
            lock_file = Path(self.lock.lock_file)
            with contextlib.suppress(OSError):
                lock_file.write_text("")  # no owner: not a stale lock
            self.lock.release()
            if self.created and [p.name for p in self.path.iterdir()] == [LOCK_NAME]:
                with contextlib.suppress(OSError):
                    lock_file.unlink()
                    self.path.rmdir()
            if os.environ.get(RUN_DIR_ENV) == str(self.path):
                del os.environ[RUN_DIR_ENV]


def _lock_file(path: Path) -> Path:
    return path / LOCK_NAME


def _child_rank() -> bool:
    """A process Lightning (or torchrun) started for a rank other than the first."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK",
                                                                "GROUP_RANK"))


def _try_lock(path: Path) -> FileLock | None:
    """The folder's lock if no live process holds it (a dead one's lock is free: the OS
    released it), else None. Says when it takes over from a run that ended without releasing."""
    path.mkdir(parents=True, exist_ok=True)
    lock_path = _lock_file(path)
    if lock_path.exists() and not lock_path.is_file():
        raise ValueError(f"{lock_path} is a folder (or another non-file); structkd keeps its "
                         "run lock there as a file: remove it")
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    previous = lock_path.read_text().strip() if lock_path.is_file() else ""
    if previous and previous != _owner():
        logger.warning("%s: taking over the folder from %s, which ended without releasing it",
                       path, previous)
    lock_path.write_text(_owner())
    return lock


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def check_out_dir(out_dir: str | Path, key: str = "trainer.out_dir") -> None:
    """A ``ValueError`` now, before any work, unless a run can write at ``out_dir`` (``key``:
    the option that names it, for the message)."""
    writable_dir(out_dir, key)


def claim_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool) -> RunDir:
    """Claim the folder a run writes into.

    A folder that already holds a run is resumed into (``resume``), emptied of that run
    (``overwrite``), or left alone: the run then goes to the first free ``<out_dir>-2``,
    ``<out_dir>-3``, ... (as Ultralytics and Lightning do), and the log says so. A folder that
    another live run holds (its lock) is never shared: the run goes to the next free one, or a
    resume stops with a message. Ranks that rank 0 launches use the folder it claimed.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and _child_rank():
        return RunDir(Path(inherited))
    check_out_dir(out_dir)
    path = Path(out_dir).expanduser()
    busy = []
    for n in itertools.count(1):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        if candidate.is_file():
            continue
        created = not candidate.exists()
        lock = _try_lock(candidate)
        if lock is None:
            if resume:
                raise ValueError(f"cannot resume {candidate}: another run is writing into it "
                                 f"({_lock_file(candidate).read_text().strip()})")
            busy.append(candidate)
            continue
        if resume or not holds_run(candidate):
            break
        if overwrite:
            _clear(candidate)
            logger.warning("trainer.overwrite: replacing the run in %s", candidate)
            break
        RunDir(candidate, lock, created).release()
    if candidate != path:
        why = "is being written by another run" if path in busy else "already holds a run"
        logger.warning("%s %s; this one goes to %s (set trainer.overwrite=true, or --overwrite, "
                       "to replace a finished run; trainer.resume=last to continue it)", path,
                       why, candidate)
    os.environ[RUN_DIR_ENV] = str(candidate)
    return RunDir(candidate, lock, created)


def _clear(path: Path) -> None:
    for m in (*RUN_MARKERS, "config.yaml", "tb", "student.json"):
        p = path / m
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def next_free(path: Path, taken: Callable[[Path], bool]) -> Path:
    """The first of ``<path>-2``, ``<path>-3``, ... that is neither ``taken`` nor a file."""
    n = 2
    while taken(path.with_name(f"{path.name}-{n}")) or path.with_name(f"{path.name}-{n}").is_file():
        n += 1
    return path.with_name(f"{path.name}-{n}")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))


def csv_logger(out_dir: Path) -> CSVLogger:
    """A CSVLogger writing ``out_dir/metrics.csv``, continuing the rows already there (a
    resumed run; a fresh or overwritten run has none). Nothing is created on disk until
    :func:`open_csv_logger` (so a trainer that fails to set up leaves no empty run folder)."""
    return CSVLogger(out_dir, name="", version="")


def open_csv_logger(log: CSVLogger, out_dir: Path, *, resume_step: int | None = None) -> None:
    """Create the run folder and the CSV writer. A resumed run redoes the steps from its
    checkpoint's ``resume_step`` on: the rows it logged from there before it stopped are
    dropped, so ``metrics.csv`` keeps one row per step."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        _drop_rows_from(out_dir / "metrics.csv", resume_step)
    log._experiment = _AppendingWriter(log_dir=str(out_dir))


def _drop_rows_from(path: Path, step: int) -> None:
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if not (r[col].isdigit() and int(r[col]) >= step)]
    if len(kept) != len(rows):
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        logger.info("%s: %d rows of the steps from %d on, which the resumed run redoes, dropped",
                    path, len(rows) - len(kept), step)
