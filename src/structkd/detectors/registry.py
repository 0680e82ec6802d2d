"""The registry of detector families: each family's adapter registers itself here (from its own
module, which imports this one: never the other way), and every question about a model is
answered through it: :func:`protocol_of`, :func:`as_detector`, :func:`family_detector`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .protocol import Detector, WrappedDetector, unwrap

__all__ = ["Adapter", "DetectorFamily", "FamilyInfo", "adapters", "as_detector",
           "builds_random_weights", "claiming_family", "class_count", "describe_families",
           "detector_family", "family_defaults", "family_detector", "protocol_of",
           "register_adapter"]


@dataclass(frozen=True)
class Adapter:
    """How to adapt one family.

    ``accepts(model)`` says whether a model is of this family; ``wrap(model, **options)``
    returns the module that trains (a :class:`WrappedDetector`, or the model itself for a
    family used as it is); ``view(module)`` its :class:`Detector` (default: the module itself,
    a wrapper). ``build(name, num_classes, **options)`` makes a detector by name and
    ``names()`` lists what it takes (ImportError without the family's package);
    ``random_weights(name)`` says whether ``build`` gives random weights (a model type or
    YAML); ``claims(name)`` whether a name or path is this family's (read without importing
    the family's package or unpickling anything), so that ``structkd.detector(name)`` finds
    the builder; ``install`` is what to install where the family's package is missing. A
    ``fallback`` adapter is asked last (torchvision's: any model in its calling convention).
    """

    name: str
    accepts: Callable[[nn.Module], bool]
    wrap: Callable[..., nn.Module]
    view: Callable[[nn.Module], Detector] | None = None
    install: str = ""
    build: Callable[..., nn.Module] | None = None
    names: Callable[[], list[str]] | None = None
    random_weights: Callable[[str], bool] | None = None
    claims: Callable[[str], bool] | None = None
    fallback: bool = False


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add a family adapter (a later registration of the same name replaces the earlier)."""
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != adapter.name]
    _ADAPTERS.append(adapter)
    return adapter


def adapters() -> list[Adapter]:
    """The registered adapters: families in registration order, fallbacks last."""
    return [a for a in _ADAPTERS if not a.fallback] + [a for a in _ADAPTERS if a.fallback]


def _adapter_for(model: nn.Module) -> Adapter | None:
    return next((a for a in adapters() if a.accepts(model)), None)


def as_detector(model: nn.Module, **options: Any) -> nn.Module:
    """The module that trains ``model`` in torchvision's calling convention: a wrapper from its
    family's adapter (``options`` go to it), or ``model`` itself (torchvision's detectors, a
    user's detector in that convention, an already wrapped one)."""
    if isinstance(model, WrappedDetector):
        if options:
            raise ValueError(f"{type(model).__name__} is already wrapped; options "
                             f"{sorted(options)} apply only when wrapping")
        return model
    adapter = _adapter_for(unwrap(model))
    if adapter is None or adapter.fallback:
        if options:
            raise ValueError(f"{type(unwrap(model)).__name__} is used as it is (torchvision's "
                             f"calling convention); the options {sorted(options)} have no "
                             "adapter to go to")
        return model
    return adapter.wrap(unwrap(model), **options)


def protocol_of(model: nn.Module) -> Detector:
    """The :class:`Detector` of a module that trains (as :func:`as_detector` returns it, also
    inside DDP / DataParallel / torch.compile)."""
    inner = unwrap(model)
    if isinstance(inner, Detector):
        return inner
    adapter = _adapter_for(inner)
    if adapter is None or adapter.view is None:
        raise TypeError(f"{type(inner).__name__} is not a detector structkd can adapt; register "
                        "an adapter for its family (structkd.detectors.register_adapter)")
    return adapter.view(inner)


def detector_family(model: nn.Module) -> str:
    """The family name that picks a method's preset (``Detector.family``)."""
    return protocol_of(model).family


def family_defaults(model: nn.Module) -> tuple[str, str | list[str]]:
    """(root, taps): the module taking the batched tensor and the default tapped path(s)."""
    view = protocol_of(model)
    return view.root, view.taps


def class_count(model: nn.Module) -> int | None:
    """The classes ``model`` predicts, background included (structkd's ``num_classes``);
    None where its protocol cannot tell (a user's detector)."""
    return protocol_of(model).num_classes


@dataclass
class DetectorFamily:
    """Which family a configured detector comes from. ``family``: "torchvision" (structkd's
    own builders, described by ``DetectorSpec``) or an adapter's name ("transformers",
    "ultralytics"); ``name``: what that family's builder takes (a model type such as
    ``rt_detr`` or ``yolo11n.yaml``, a local folder or file, a hub name); ``size``: the size of
    a model built from a type ("tiny", "small"); ``options``: the builder's other options
    (e.g. ``num_queries`` of a transformers model)."""

    family: str = "torchvision"
    name: str | None = None
    size: str = "tiny"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family == "torchvision":
            if self.name is not None:
                raise ValueError(f"name={self.name!r} goes with a family other than torchvision "
                                 "(torchvision detectors are described by arch, backbone, ...)")
            return
        known = {a.name: a for a in adapters()}
        if self.family not in known or known[self.family].build is None:
            buildable = ["torchvision", *(n for n, a in known.items()
                                          if a.build is not None and not a.fallback)]
            raise ValueError(f"family={self.family!r}; expected one of {buildable}")
        if not self.name:
            raise ValueError(f"family={self.family!r} needs a name (e.g. a model type, a local "
                             "folder or file)")


def family_detector(family: str, name: str, num_classes: int, *, options_key: str = "options",
                    **options: Any) -> nn.Module:
    """A detector of ``family`` built by its adapter's builder from ``name`` (``options``: the
    builder's, e.g. ``size``, ``min_size``, ``max_size``; an unknown one is a ValueError
    naming ``options_key.<option>``, e.g. "model.options.x")."""
    known = {a.name: a for a in adapters()}
    adapter = known.get(family)
    if adapter is None or adapter.build is None:
        raise ValueError(f"no builder for the family {family!r}; expected one of "
                         f"{[n for n, a in known.items() if a.build is not None]}")
    try:
        return adapter.build(name, num_classes, **options)
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown is None:
            raise
        raise ValueError(f"{options_key}.{unknown.group(1)}: not an option of the {family} "
                         f"builder for {name!r} ({e})") from None


def claiming_family(name: str) -> str | None:
    """The family whose builder takes ``name`` (its ``claims``), or None."""
    return next((a.name for a in adapters() if a.claims is not None and a.build is not None
                 and a.claims(name)), None)


def builds_random_weights(family: str, name: str) -> bool:
    """Whether ``family``'s builder makes ``name`` with random weights (e.g. a model YAML)."""
    adapter = {a.name: a for a in adapters()}.get(family)
    return bool(adapter is not None and adapter.random_weights is not None
                and adapter.random_weights(name))


@dataclass(frozen=True)
class FamilyInfo:
    """What ``structkd models`` shows of a family in this installation."""

    family: str
    available: bool
    names: list[str]
    note: str  # what else the builder takes, or what to install


def describe_families() -> list[FamilyInfo]:
    """Every family buildable by name: its builder's names where its package is installed,
    else the command that installs it."""
    out = []
    for a in adapters():
        if a.build is None or a.fallback:
            continue
        try:
            names = a.names() if a.names is not None else []
        except ImportError:
            out.append(FamilyInfo(a.name, False, [], a.install))
            continue
        out.append(FamilyInfo(a.name, True, names, "or a local file / folder"))
    return out
