"""The detector protocol: what training, distillation, the teacher cache, evaluation and export
need of a detector, whatever its family.

Inside structkd every detector trains and predicts in torchvision's calling convention:

* ``model(images, targets)`` in train mode returns a dict of losses whose sum is trained
  (``images``: list of (3, H, W) float tensors in [0, 1]; ``targets``: dicts with ``boxes``
  XYXY in pixels and ``labels`` 1..K, 0 being the background);
* ``model(images)`` in eval mode returns one dict per image with ``boxes`` (XYXY, the image's own
  pixels), ``labels`` (1..K) and ``scores``.

Everything else structkd asks of a detector is a :class:`Detector`: its family (which picks a
method's preset), the module that takes the batched images (``root``) and the default tapped
levels (``taps``), the module of its forward that batches the images (``batch_path``), its
input normalisation and resizing (a teacher cache's key), its class count, how it is exported
and saved by its own library. ``structkd.detectors.protocol_of(model)`` gives it for any model:
a family's wrapper (:class:`WrappedDetector`, an ``nn.Module`` that is the detector that trains)
is its own protocol; torchvision's detectors, used as they are, get a view
(``structkd.detectors.torchvision``). Nothing above ``structkd.detectors`` asks which family a
model is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..methods.context import HeadLevel, QueryLayer

__all__ = ["Detector", "HeadInfo", "WrappedDetector", "remove_hooks", "unwrap"]


@dataclass(frozen=True)
class HeadInfo:
    """What a detector's head gives a head-level method: ``kind`` "dense" (per-location class
    logits and boxes, :class:`~structkd.methods.HeadLevel`), "detr" (per decoder layer, class
    logits and boxes per query, :class:`~structkd.methods.QueryLayer`) or None (none that
    structkd reads, ``why`` says so); ``bins``: the bins of its per-edge box distribution (DFL), 0
    without one; ``anchors``: anchors per location; ``name``: how messages call the head."""

    kind: str | None
    bins: int = 0
    anchors: int = 1
    name: str = ""
    why: str = ""


class Detector:
    """What structkd needs of a detector beyond its forward (the protocol).

    Attributes: ``family`` (the preset name of methods, e.g. "retinanet", "detr", "yolo");
    ``adapter`` (the registered adapter that makes it); ``root`` and ``taps`` (module paths,
    relative to the module that trains: the one taking the batched images, and the default
    tapped level(s)); ``batch_path`` (the module of the forward whose output is the batch:
    ``(images, targets)`` with ``images.tensors`` (B, 3, H, W), ``images.image_sizes`` and the
    targets in the batch's pixels, as torchvision's ``GeneralizedRCNNTransform`` returns them;
    None: the input of ``root`` is the batch); ``dynamic_export`` (ONNX may take any input
    size). The defaults read such a transform, found by :meth:`batching`.
    """

    family: str = "custom"
    adapter: str = ""
    root: str = "backbone"
    taps: str | list[str] = "backbone"
    batch_path: str | None = "transform"
    dynamic_export: bool = True
    head_path: str | None = None

    @property
    def detector(self) -> nn.Module:
        """The module that trains (a wrapper itself; the model a view looks at)."""
        raise NotImplementedError

    def head_info(self) -> HeadInfo:
        """What the head gives (a family without head outputs says why not)."""
        return HeadInfo(None, why=f"structkd reads no head outputs of {self.family} detectors "
                                  f"({type(self.detector).__name__})")

    def run_head(self, levels: Sequence[Tensor]) -> Any:
        """The head's raw predictions on the default tapped levels (a teacher's head run on its
        own levels)."""
        if self.head_path is None:
            raise ValueError(self.head_info().why)
        return self.detector.get_submodule(self.head_path)(list(levels))

    def head_levels(self, raw: Any, levels: Sequence[Tensor],
                    batch_shape: tuple[int, int]) -> list[HeadLevel]:
        """The head's raw predictions (``raw``, from ``levels`` of a batch of ``batch_shape``)
        as one :class:`HeadLevel` per level, in the levels' order."""
        raise ValueError(self.head_info().why)

    def query_layers(self, raw: Any) -> list[QueryLayer]:
        """A DETR-family detector's raw output (its model's, recorded at ``head_path``) as its
        predictions per decoder layer, first to last, denoising queries left out."""
        raise ValueError(self.head_info().why)

    def run_queries(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]] | None) -> Any:
        """The raw output of a DETR-family detector (eval mode) on a batched input: what
        :meth:`query_layers` reads (a teacher's decoder run on the student's batch)."""
        raise ValueError(self.head_info().why)

    def cross_cuts(self, cut: int) -> dict[str, str | None]:
        """For each branch of the head ("cls", "reg"), the module whose output is the branch's
        feature after its first ``cut`` layers (None: the head's input levels): where CrossKD
        reads a student's head features."""
        raise ValueError(f"the head of {self.head_info().name or self.family} cannot be run "
                         "from an inner layer (CrossKD reads torchvision's RetinaNet and FCOS "
                         "heads)")

    def run_head_from(self, cut: int, inputs: dict[str, list[Tensor]]) -> Any:
        """The head's raw predictions with each branch run from its layer ``cut`` on
        ``inputs`` (per branch, one map per level): CrossKD's teacher half."""
        raise ValueError(f"the head of {self.head_info().name or self.family} cannot be run "
                         "from an inner layer")

    def batching(self) -> nn.Module | None:
        """The module at ``batch_path`` (None without one)."""
        if self.batch_path is None:
            return None
        return self.detector.get_submodule(self.batch_path)

    @property
    def num_classes(self) -> int | None:
        """structkd's class count (object classes + 1 for the background); None: unknown."""
        return None

    def normalisation(self) -> tuple[list[float], list[float]] | None:
        """The (mean, std) the batch is normalised with; None when unknown."""
        t = self.batching()
        if t is None or not hasattr(t, "image_mean"):
            return None
        return list(t.image_mean), list(t.image_std)

    def transform_settings(self) -> dict[str, Any]:
        """What batching does to an image (sizes, padding, normalisation): what a teacher
        cache's levels depend on besides the teacher."""
        t = self.batching()
        if t is None or not hasattr(t, "min_size"):
            raise ValueError("a teacher cache needs a detector whose forward batches the images "
                             "with a known resize (torchvision's GeneralizedRCNNTransform): its "
                             "batches are what the cache replays")
        return {"min_size": list(t.min_size), "max_size": t.max_size,
                "size_divisible": t.size_divisible, "fixed_size": t.fixed_size,
                "normalisation": self.normalisation()}

    def batch_images(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """The batch the forward makes of ``images`` at evaluation (no random resize):
        (B, 3, H, W) and each image's (h, w) in it."""
        t = self.batching()
        if t is None:
            raise ValueError(f"{type(self.detector).__name__} has no batching module "
                             "(batch_path); its batches cannot be made outside its forward")
        was = t.training
        t.eval()
        try:
            batch, _ = t(images)
        finally:
            t.train(was)
        return batch.tensors, [tuple(s) for s in batch.image_sizes]

    def export_size(self) -> tuple[int, int] | None:
        """The square input an export takes by default: the resize's ``min_size`` capped at
        ``max_size`` (None when unknown)."""
        t = self.batching()
        sizes = getattr(t, "min_size", None)
        if not sizes:
            return None
        lo = int(sizes[-1] if isinstance(sizes, list | tuple) else sizes)
        side = min(lo, int(getattr(t, "max_size", lo)))
        return side, side

    def arch_name(self) -> str:
        """The architecture's name in an export's metadata."""
        return type(self.detector).__name__.lower()

    def check_exportable(self) -> None:
        """Raise a ValueError saying why the detector cannot be exported as ONNX."""

    def save_native(self, path: str | Path) -> Path | None:
        """Save the detector as its own library saves it; None where it has no such save."""
        return None

    def rebuild_name(self, native: Path) -> str:
        """What the family's builder takes, beside the native save, to rebuild the
        architecture (the weights then come from structkd's safetensors)."""
        return native.name

    def options(self) -> dict[str, Any]:
        """The builder options (input size, post-processing) that rebuild this detector with
        its native save."""
        return {}


class WrappedDetector(nn.Module, Detector):
    """A detector of another family in torchvision's calling convention, and its own
    :class:`Detector`.

    Subclasses set ``family``, ``adapter``, ``root`` and ``taps`` (relative to the wrapper),
    keep the wrapped model in ``self.model`` and a batching transform in ``self.transform``
    (torchvision's ``GeneralizedRCNNTransform``, used by :meth:`batched`), and implement
    ``num_classes``.
    """

    family = "custom"
    adapter = ""
    root = "model"
    taps: str | list[str] = "model"
    batch_path = "transform"
    dynamic_export = False  # anchors and query positions are traced as constants
    model: nn.Module
    transform: nn.Module

    @property
    def detector(self) -> nn.Module:
        return self

    def batched(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
                ) -> tuple[Any, list[dict[str, Tensor]] | None, list[tuple[int, int]]]:
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

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def arch_name(self) -> str:
        """``adapter:type``, e.g. ``transformers:rt_detr``, ``ultralytics:DetectionModel``."""
        inner = getattr(self, "model", None)
        config = getattr(inner, "config", None)
        kind = getattr(config, "model_type", None) or type(inner).__name__
        return f"{self.adapter}:{kind}"


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
