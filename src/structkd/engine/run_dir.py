"""The run directory: never overwrite a finished run, resume into the same files, append logs."""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

logger = logging.getLogger("structkd.engine")

RUN_MARKERS = ("results.json", "checkpoints", "student.safetensors", "metrics.csv")


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds (part of) a structkd run."""
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def prepare_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """The directory a run writes into.

    A directory that already holds a run is resumed into (``resume``), emptied of that run
    (``overwrite``), or left alone: the run then goes to the first free ``<out_dir>-2``,
    ``<out_dir>-3``, ... (as Ultralytics and Lightning do), and the log says so.
    """
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"trainer.out_dir={str(out_dir)!r} is an existing file; expected a "
                         "directory (or a path that does not exist yet)")
    if resume or not holds_run(path):
        return path
    if overwrite:
        for m in (*RUN_MARKERS, "config.yaml", "tb", "student.json"):
            p = path / m
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        logger.warning("trainer.overwrite: replacing the run in %s", path)
        return path
    fresh = next_free(path, holds_run)
    logger.warning("%s already holds a run; this one goes to %s (set trainer.overwrite=true, or "
                   "--overwrite, to replace it; trainer.resume=last to continue it)", path, fresh)
    return fresh


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


def open_csv_logger(log: CSVLogger, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    log._experiment = _AppendingWriter(log_dir=str(out_dir))
