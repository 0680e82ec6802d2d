"""A clean console: each message once, no third-party advertisements, known harmless warnings
filtered where they come from (by module and message, never wholesale)."""

from __future__ import annotations

import contextlib
import logging
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
