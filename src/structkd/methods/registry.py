"""The registry of methods by name: register, resolve, build (the one place options are
validated), and describe them for ``structkd methods``.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_types
from ..defaults import DEFAULT_METHOD
from .base import DistillMethod
from .context import Level
from .together import split_names

__all__ = [
    "ALIASES",
    "DEFAULT_METHOD",
    "METHODS",
    "MethodInfo",
    "build_method",
    "check_method",
    "describe_methods",
    "method_info",
    "method_names",
    "register_method",
    "resolve_method",
]

METHODS: dict[str, type[DistillMethod]] = {}
# alias -> (method name, fixed options), e.g. "ssim" -> ("imitation", {"distance": "ssim"})
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register_method(
    name: str, *, aliases: Mapping[str, Mapping[str, Any]] | None = None, replace: bool = False,
) -> Callable[[type[DistillMethod]], type[DistillMethod]]:
    """Class decorator: make a ``DistillMethod`` buildable by ``name`` (config, CLI, API).

    ``aliases`` name fixed option sets (``{"ssim": {"distance": "ssim"}}``).
    """

    def decorate(cls: type[DistillMethod]) -> type[DistillMethod]:
        if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
            raise TypeError(f"{cls!r} is not a DistillMethod subclass")
        taken = set(METHODS) | set(ALIASES)
        new = {name, *(aliases or {})}
        if not replace and new & taken:
            raise ValueError(f"method name(s) {sorted(new & taken)} are already registered")
        cls.name = name
        METHODS[name] = cls
        for alias, fixed in (aliases or {}).items():
            ALIASES[alias] = (name, dict(fixed))
        return cls

    return decorate


def method_names() -> list[str]:
    """Every name ``build_method`` accepts: methods, then aliases."""
    return [*METHODS, *ALIASES]


def resolve_method(name: str) -> tuple[type[DistillMethod], dict[str, Any]]:
    """The class and fixed options of a method name or alias."""
    if isinstance(name, str) and name in METHODS:
        return METHODS[name], {}
    if isinstance(name, str) and name in ALIASES:
        base, fixed = ALIASES[name]
        return METHODS[base], dict(fixed)
    raise ValueError(f"method={name!r} is unknown; expected one of {sorted(METHODS)} or an "
                     f"alias {sorted(ALIASES)} (register your own with @register_method)")


def _signature_options(cls: type) -> tuple[dict[str, Any], bool]:
    """Keyword options of ``cls.__init__`` with defaults, and whether it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters
    options = {}
    var_kw = False
    for i, (n, p) in enumerate(params.items()):
        if i < 2 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY):  # self, levels
            continue
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL:
            options[n] = None if p.default is p.empty else p.default
    return options, var_kw


def build_method(
    name: str, levels: Sequence[Level] | Mapping[str, Level], **options: Any
) -> DistillMethod:
    """Build a registered method (or alias) for ``levels``.

    The one place a method's options are checked: names and types against the class's
    signature here (an unknown name fails with the valid ones listed, a value of another type
    names its annotation; methods that forward ``**options``, such as the imitation method to
    its distance, have them checked where they are forwarded, by the same two checks), values by
    the class itself (``ValueError`` naming the option and the value).
    """
    cls, fixed = resolve_method(name)
    clash = {k: v for k, v in options.items() if k in fixed and fixed[k] != v}
    if clash:
        raise ValueError(f"method {name!r} fixes {fixed}; options {clash} contradict it")
    allowed, var_kw = _signature_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown and not var_kw:
        raise ValueError(f"option(s) {unknown} are not accepted by method {cls.name!r}; expected "
                         f"some of {sorted(allowed)}")
    check_types(options, _hints(cls), f"method {name!r}")
    return cls(levels, **{**fixed, **options})


def _hints(cls: type) -> dict[str, Any]:
    """The annotations of ``cls.__init__`` (none where they cannot be resolved: a user's
    class annotating with a name its module does not import)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:
        return {}


def check_method(name: str, options: Mapping[str, Any]) -> None:
    """Validate a method name and its options before any detector exists, by building the
    method on one small level: the same path, and the same messages, as the real build.
    The global random state is left as it was (the trial build initialises layers)."""
    names = split_names(name)
    with torch.random.fork_rng(devices=[]):
        if len(names) == 1:
            build_method(names[0], [Level("s8", 8, 4, 4)], **options)
            return
        keys = set(names) | {"weight"}
        unknown = sorted(set(options) - keys)
        if unknown:
            raise ValueError(f"options {unknown} of method {name!r}: options of several methods "
                             f"are given per method, e.g. {{{names[0]!r}: {{...}}}}, under the "
                             f"names {names} (and 'weight', the overall weight)")
        for n in names:
            own = options.get(n) or {}
            if not isinstance(own, Mapping):
                raise ValueError(f"options of {n!r}: {own!r}; expected a mapping of its options")
            build_method(n, [Level("s8", 8, 4, 4)], **own)


@dataclass(frozen=True)
class MethodInfo:
    """What ``structkd methods`` prints: name, paper, options with defaults, aliases."""

    name: str
    summary: str
    paper: str
    options: dict[str, Any]
    aliases: dict[str, dict[str, Any]]
    needs_boxes: bool
    needs_head: str | None = None
    needs_distribution: bool = False
    supports: str = "every family"
    extra_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    preset_strides: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def method_info(name: str) -> MethodInfo:
    cls, _ = resolve_method(name)
    options, _ = _signature_options(cls)
    doc = inspect.getdoc(cls) or ""
    extra = cls.extra_options() if hasattr(cls, "extra_options") else {}
    return MethodInfo(
        name=cls.name, summary=doc.splitlines()[0] if doc else "", paper=cls.paper,
        options=options, needs_boxes=cls.needs_boxes, needs_head=cls.needs_head,
        needs_distribution=cls.needs_distribution, supports=cls.supports,
        extra_options=extra,
        presets={k: dict(v) for k, v in cls.presets.items()},
        preset_strides={k: tuple(v) for k, v in cls.preset_strides.items()},
        aliases={a: p for a, (base, p) in ALIASES.items() if base == cls.name},
    )


def describe_methods() -> list[MethodInfo]:
    """Every registered method, in registration order."""
    return [method_info(n) for n in METHODS]
