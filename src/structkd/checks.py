"""Option checks shared by every room: one message format, ``name=value; what was expected``;
and whether an output file can be written, before the work that fills it."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["check_choice", "check_positive", "writable_dir", "writable_file"]

T = TypeVar("T")


def check_choice(name: str, value: T, choices: Iterable[Any]) -> T:
    """``value`` unless it is not one of ``choices`` (then a ``ValueError`` listing them)."""
    options = list(choices)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {options}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float; a ``ValueError`` naming the option unless it is finite and > 0
    (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is invalid; expected a finite number {bound}")
    return float(value)


def writable_file(path: str | os.PathLike, option: str) -> Path:
    """``path`` once it is known that a file can be written there (its folder created): checked
    before the work whose result it will hold, so a bad path costs nothing. A ``ValueError``
    names the option, the path and the reason."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{option} {target} is a directory; expected a file path")
    existed = target.exists()
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{option} {target}: cannot write there ({blocker} is a file, not a "
                         "folder)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a"):
            pass
    except OSError as e:
        raise ValueError(f"{option} {target}: cannot write there ({e.strerror or e})") from None
    if not existed:
        target.unlink()
    return target


def writable_dir(path: str | os.PathLike, option: str) -> Path:
    """``path`` once it is known that files can be written into it (the folder, or the parent
    it will be created in, created if missing): a ``ValueError`` names the option, the path
    and the reason, before the work that fills it."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option}={str(path)!r} is an existing file; expected a folder (or a "
                         "path that does not exist yet)")
    where = target if target.exists() else target.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise ValueError(f"{option}={str(path)!r}: cannot write into {where} "
                         f"({e.strerror or e}); choose a writable folder") from None
    return target
