"""Options of the distances, each declared once: a frozen dataclass per distance.

``DistanceOptions`` gives every options dataclass its constructor from keyword arguments (unknown
names raise a ``ValueError`` listing the valid ones), its defaults, and the keyword signature that
the distance functions and modules show. ``NormalizeOptions`` holds the min-max rescaling options
shared by every distance (SSIM adds its own fields to them).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..checks import check_choice
from ._checks import check_number
from .normalize import DEFAULT_EPS, NORMALIZE_MODES

_Options = TypeVar("_Options", bound="DistanceOptions")
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True, kw_only=True)
class DistanceOptions:
    """Base of the options dataclasses: build from keywords, list defaults, make signatures."""

    label: ClassVar[str] = "this distance"  # how error messages name the options' owner

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        """The options, a subclass's own first (e.g. SSIM's, then the normalisation ones)."""
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        own = [n for k in cls.__mro__ for n in vars(k).get("__annotations__", {}) if n in by_name]
        return [by_name[n] for n in dict.fromkeys(own)]

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in the order of ``fields``."""
        return [f.name for f in cls.fields()]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default, in the order of ``fields``."""
        return {f.name: f.default for f in cls.fields()}

    @classmethod
    def check_names(cls, names: Iterable[str], what: str | None = None) -> None:
        """Raise a ``ValueError`` naming the unknown option(s) and listing the valid ones."""
        unknown = sorted(set(names) - set(cls.names()))
        if unknown:
            raise ValueError(
                f"option(s) {unknown} are not accepted by {what or cls.label}; expected some of "
                f"{sorted(cls.names())}"
            )

    @classmethod
    def from_kwargs(cls: type[_Options], **options: Any) -> _Options:
        """The options from keyword arguments, with their names and values validated."""
        cls.check_names(options)
        return cls(**options)

    @classmethod
    def signature(cls, *leading: str, **defaults: Any) -> inspect.Signature:
        """``(*leading, *, option=default, ...)``: the signature of a callable taking
        ``**options`` (``defaults`` replaces some of the dataclass defaults)."""
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in leading]
        params += [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                              default=defaults.get(f.name, f.default), annotation=f.type)
            for f in cls.fields()
        ]
        return inspect.Signature(params)

    @classmethod
    def takes_options(cls, *leading: str, **defaults: Any) -> Callable[[_F], _F]:
        """Decorator: give a ``(*leading, **options)`` callable the signature of its options, so
        that ``help()`` and ``inspect.signature`` list them with their defaults."""

        def decorate(fn: _F) -> _F:
            fn.__signature__ = cls.signature(*leading, **defaults)  # type: ignore[attr-defined]
            return fn

        return decorate


@dataclass(frozen=True, kw_only=True)
class NormalizeOptions(DistanceOptions):
    """How both maps are prepared: min-max rescaling and the finiteness check.

    ``normalize`` rescales each map to [0, 1] with its own statistics: per sample over (C, H, W)
    ("minmax", the default), per sample and channel ("minmax_channel"), or not at all (None).
    ``eps`` is added to the range (max - min) so that constant maps give zeros. ``check_finite``
    raises on NaN or Inf inputs (one scan, or a look at the extremes with min-max on).
    """

    label: ClassVar[str] = "the L1/MSE distances"

    normalize: str | None = "minmax"
    eps: float = DEFAULT_EPS
    check_finite: bool = True

    def __post_init__(self) -> None:
        check_choice("normalize", self.normalize, NORMALIZE_MODES)
        check_number("eps", self.eps)
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"check_finite={self.check_finite!r} must be true or false")
