"""A clean console: each message once, no third-party advertisements, known harmless warnings
filtered where they come from (by module and message, never wholesale), and an error the user
can fix said in one line (:func:`error_line`)."""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import warnings
from collections.abc import Iterator

# Messages (regex) of warnings that say nothing to a structkd user.
HARMLESS_WARNINGS = (
    # Lightning 2.6 calls torch.utils._pytree.LeafSpec, deprecated by torch 2.9+.
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    # structkd resumes and overwrites run directories itself (engine/run_dir.py).
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
)
# Log records from Lightning that advertise other products.
ADVERTISEMENTS = ("💡 Tip:", "litlogger", "LitLogger")


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(a in msg for a in ADVERTISEMENTS)


def setup_console(verbose: bool = False) -> None:
    """One root handler for every logger (Lightning's own handlers removed, so its messages
    are not printed twice), adverts dropped, known harmless warnings filtered."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NoAdverts())
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.captureWarnings(True)  # warnings become log lines: printed above progress bars


@contextlib.contextmanager
def quieter(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of some loggers for a while (a multi-run job keeps its own progress
    bar; per-run information lines would bury it)."""
    known = list(logging.root.manager.loggerDict)  # children may carry their own level
    loggers = [logging.getLogger(n) for n in sorted({*names, *(k for k in known for n in names
                                                              if k.startswith(n + "."))})]
    before = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            if lg.getEffectiveLevel() < level or lg.level:
                lg.setLevel(max(level, lg.level))
        yield
    finally:
        for lg, lv in zip(loggers, before, strict=True):
            lg.setLevel(lv)


# What the machine refuses, not a bug: one line naming the file (full disk, read-only,
# permissions, a file where a folder is expected).
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


def error_line(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix; None for a bug (keep its traceback).

    Errors the machine raises (a full disk, a read-only folder) name the file; an error raised
    in a DataLoader worker (which torch re-raises with the worker's whole traceback as its
    message) is reduced to the worker's original message.
    """
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
        where = f"{e.filename}: " if e.filename else ""
        hint = "; free some space and resume (trainer.resume=last)" \
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return f"{where}{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)}){hint}"
    lightning_misconfig = any(c.__name__ == "MisconfigurationException" and
                              c.__module__.startswith("lightning") for c in type(e).__mro__)
    if not lightning_misconfig and not isinstance(
            e, (ValueError, FileNotFoundError, FloatingPointError, RuntimeError)):
        return None
    text = str(e)
    wrapped = re.match(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback", text)
    if wrapped:
        # the worker's traceback ends with "[module.]Name: original message"
        ends = [m.end() for m in re.finditer(rf"^(?:[\w.]+\.)?{wrapped.group(1)}: ", text, re.M)]
        if ends:
            text = text[ends[-1]:].strip()
    return text
