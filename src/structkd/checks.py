"""Option checks shared by every room: one message format, ``name=value; what was expected``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["check_choice", "check_positive"]

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
