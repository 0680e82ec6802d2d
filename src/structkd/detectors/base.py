"""The detector protocol: what the engine, the ``Distiller``, evaluation and export need of a
detector, and the registry that finds a family's adapter by the model's type.

Inside structkd every detector speaks torchvision's calling convention:

* ``model(images, targets)`` in train mode returns a dict of losses whose sum is trained
  (``images``: list of (3, H, W) float tensors in [0, 1]; ``targets``: dicts with ``boxes``
  XYXY in pixels and ``labels`` 1..K, 0 being the background);
* ``model(images)`` in eval mode returns one dict per image with ``boxes`` (XYXY, the image's own
  pixels), ``labels`` (1..K) and ``scores``;
* a ``transform`` (torchvision's ``GeneralizedRCNNTransform``) resizes, normalises and pads the
  images into the batched tensor that the tapped levels are computed from.

torchvision's detectors (and a user's detector written in that convention) are used as they
are. Other families are wrapped by their adapter into a :class:`WrappedDetector`, which also
says what the family's defaults are: the module that takes the batched tensor (``root``), the
tapped levels (``taps``) and the family name that picks a method's preset.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

__all__ = ["Adapter", "DetectorFamily", "FamilyInfo", "WrappedDetector", "adapters",
           "as_detector", "builds_random_weights", "class_count", "describe_families",
           "detector_family", "family_defaults", "family_detector", "register_adapter",
           "remove_hooks", "unwrap"]


class WrappedDetector(nn.Module):
    """A detector of another family in torchvision's calling convention.

    Subclasses set ``family`` (a method preset name, e.g. "detr", "yolo"), ``root`` (the module
    path, relative to this wrapper, that takes the batched image tensor) and ``taps`` (the
    default tapped module path(s)); they keep the wrapped model in ``self.model`` and a
    ``GeneralizedRCNNTransform`` in ``self.transform``.
    """

    family: str = "custom"
    adapter: str = ""  # the name of the adapter that builds it (``Adapter.name``)
    root: str = "model"
    taps: str | list[str] = "model"
    model: nn.Module
    transform: nn.Module

    def batched(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
                ) -> tuple[ImageList, list[dict[str, Tensor]] | None, list[tuple[int, int]]]:
        """The transform's batch and resized targets, and each image's original (h, w): the
        start of every wrapper's forward (targets are required in training mode)."""
        if self.training and targets is None:
            raise ValueError("in training mode the targets are needed (boxes, labels)")
        original = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        return batch, targets, original

    def class_ids(self, target: dict[str, Tensor], attribute: str) -> Tensor:
        """The target's labels 1..K as the family's class ids 0..K-1, K = ``num_classes - 1``;
        a label outside is refused naming it, its image and the model's ``attribute`` (the
        name the family gives K)."""
        k = self.num_classes - 1
        ids = target["labels"].long() - 1
        bad = ids[(ids < 0) | (ids >= k)]
        if bad.numel():
            raise ValueError(f"label {int(bad[0]) + 1} of image {target.get('image_id')} is "
                             f"outside 1..{k} (the model's {attribute}={k} object classes)")
        return ids

    def save_native(self, path: str | Path) -> Path | None:
        """Save the wrapped model alone, as its own library saves it; None if it cannot."""
        return None

    def rebuild_name(self, native: Path) -> str:
        """What the family's builder takes, beside the native save, to rebuild this detector's
        architecture (the weights then come from structkd's safetensors)."""
        return native.name

    @property
    def num_classes(self) -> int:
        """structkd's class count: object classes + 1 (the background)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The wrapper's own options (input size, post-processing), as its builder takes them:
        with the native save they rebuild this detector."""
        return {}


@dataclass(frozen=True)
class Adapter:
    """How to adapt one family: ``accepts(model)`` says whether a model is of this family,
    ``wrap(model, **options)`` returns a :class:`WrappedDetector` around it."""

    name: str
    accepts: Callable[[nn.Module], bool]
    wrap: Callable[..., WrappedDetector]
    install: str = ""  # what to install for this family, shown where it is missing
    # build(name, num_classes, size=..., min_size=..., max_size=...): a detector by name
    build: Callable[..., WrappedDetector] | None = None
    # names(): what ``build`` takes by name in this installation (raises ImportError without
    # the family's package)
    names: Callable[[], list[str]] | None = None
    # random_weights(name): whether ``build(name, ...)`` gives random weights (a model type or
    # YAML built from its configuration, not a checkpoint): refused as a teacher by default
    random_weights: Callable[[str], bool] | None = None


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add a family adapter (a later registration of the same name replaces the earlier)."""
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != adapter.name]
    _ADAPTERS.append(adapter)
    return adapter


def adapters() -> list[Adapter]:
    """The registered family adapters, in registration order."""
    from . import transformers as _transformers  # noqa: F401  (registers itself)
    from . import ultralytics as _ultralytics  # noqa: F401  (imports ultralytics lazily)

    return list(_ADAPTERS)


def as_detector(model: nn.Module, **options: Any) -> nn.Module:
    """``model`` in torchvision's calling convention: a wrapped model of a registered family
    (``options`` go to its adapter), or ``model`` itself (torchvision's detectors, a user's
    detector in that convention, an already wrapped one)."""
    if isinstance(model, WrappedDetector):
        if options:
            raise ValueError(f"{type(model).__name__} is already wrapped; options "
                             f"{sorted(options)} apply only when wrapping")
        return model
    inner = unwrap(model)
    for adapter in adapters():
        if adapter.accepts(inner):
            return adapter.wrap(inner, **options)
    if options:
        raise ValueError(f"{type(inner).__name__} is used as it is (torchvision's calling "
                         f"convention); the options {sorted(options)} have no adapter to go to")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_state_dict_hooks",
               "_load_state_dict_pre_hooks")


def remove_hooks(model: nn.Module, *, structkd_only: bool = True) -> int:
    """Remove hooks from every module of ``model``: structkd's forward hooks (a tap's, an
    integration's: any hook whose class or function is defined in structkd), or with
    ``structkd_only=False`` every hook of every kind (a copy about to be pickled as the model
    alone). Returns the number removed."""
    removed = 0
    for module in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks") if structkd_only else _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if not hasattr(hooks, "items"):
                continue
            for key, hook in list(hooks.items()):
                if not structkd_only or _from_structkd(hook):
                    del hooks[key]
                    removed += 1
    return removed


def _from_structkd(hook: object) -> bool:
    owner = getattr(hook, "__module__", None) or type(hook).__module__
    return str(owner).startswith("structkd.") or type(hook).__module__.startswith("structkd.")


def detector_family(model: nn.Module) -> str:
    """The family name that picks a method's preset: a wrapper's ``family``; for torchvision
    detectors "retinanet", "fcos", "fasterrcnn", "ssd" or "ssdlite" (else "custom")."""
    inner = unwrap(model)
    if isinstance(inner, WrappedDetector):
        return inner.family
    name = type(inner).__name__.lower()
    for family in ("fcos", "retinanet", "ssdlite", "ssd"):
        if family in name:
            return family
    if "rcnn" in name:
        return "fasterrcnn"
    return "custom"


def class_count(model: nn.Module) -> int | None:
    """The classes ``model`` predicts, background included (structkd's ``num_classes``): a
    wrapper's own count, torchvision's class heads' (RetinaNet, FCOS, SSD, Faster R-CNN);
    None where it cannot be read (a user's detector)."""
    inner = unwrap(model)
    if isinstance(inner, WrappedDetector):
        return inner.num_classes
    head = getattr(getattr(inner, "head", None), "classification_head", None)
    for value in (getattr(head, "num_classes", None), getattr(head, "num_columns", None)):
        if isinstance(value, int):
            return value
    score = getattr(getattr(getattr(inner, "roi_heads", None), "box_predictor", None),
                    "cls_score", None)
    return int(score.out_features) if isinstance(score, nn.Linear) else None


def family_defaults(model: nn.Module) -> tuple[str, str | list[str]]:
    """(root, taps): the module taking the batched tensor and the default tapped path(s);
    ``("backbone", "backbone")`` (trunk + FPN output) for torchvision's detectors."""
    inner = unwrap(model)
    if isinstance(inner, WrappedDetector):
        return inner.root, inner.taps
    return "backbone", "backbone"


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
            buildable = ["torchvision", *(n for n, a in known.items() if a.build is not None)]
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
    """Every buildable family: its builder's names where its package is installed, else the
    command that installs it."""
    out = []
    for a in adapters():
        if a.build is None:
            continue
        try:
            names = a.names() if a.names is not None else []
        except ImportError:
            out.append(FamilyInfo(a.name, False, [], a.install))
            continue
        out.append(FamilyInfo(a.name, True, names, "or a local file / folder"))
    return out
