"""Option checks shared by every room: one message format, ``name=value; what was expected``
(values against their annotations: :func:`check_types`); and whether an output file can be
written, before the work that fills it."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import types
import typing
from collections import abc
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = ["check_choice", "check_positive", "check_types", "fits", "type_text", "writable_dir",
           "writable_file"]

_SCALARS = (bool, int, float, str, type(None))

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


def type_text(tp: Any) -> str:
    """A reader's name for an annotation: ``float``, ``list of str``, ``one of ['a', 'b']``."""
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and tp in _SCALARS:
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin in (list, abc.Sequence):
        return f"a list of {type_text(args[0])}" if args else "a list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_text(args[0])}"
        return f"a list of {len(args)} values ({', '.join(type_text(a) for a in args)})"
    if origin in (dict, abc.Mapping) or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the annotation ``tp``, as a config value is: an ``int`` for a
    ``float``, a list for a tuple or a sequence; ``bool`` is no number. An annotation this does
    not know (a protocol, a callable) takes any value: the receiver checks it."""
    if tp is Any or tp is object:
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args,
                                                                                strict=True))
        return not args or all(fits(v, args[0]) for v in value)
    if origin in (dict, abc.Mapping):
        return isinstance(value, Mapping)
    if isinstance(tp, type) and origin is None:
        return isinstance(value, tp) or (tp in (Path, os.PathLike) and isinstance(value, str))
    return True


def check_types(options: Mapping[str, Any], hints: Mapping[str, Any], owner: str = "") -> None:
    """A ``ValueError`` for the first option whose value is not of its annotation in ``hints``
    (``window_size=7.5; expected int``); options without an annotation are the receiver's."""
    for name, value in options.items():
        tp = hints.get(name)
        if tp is not None and not fits(value, tp):
            where = f" ({owner})" if owner else ""
            raise ValueError(f"{name}={value!r}; expected {type_text(tp)}{where}")
