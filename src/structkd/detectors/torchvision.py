"""torchvision's detectors, and a user's detector in torchvision's calling convention, as they
are: trained without a wrapper, seen through a :class:`TorchvisionDetector` view.

The family comes from the model's class name (RetinaNet, FCOS, Faster R-CNN, SSD, SSDlite; anything
else is "custom"); the batch is the output of its ``GeneralizedRCNNTransform`` (``transform``),
or, for a detector without one, the input of its ``backbone``; the default taps are the
backbone's output (trunk + FPN). Exported as ONNX: RetinaNet, FCOS and Faster R-CNN.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .protocol import Detector
from .registry import Adapter, register_adapter

__all__ = ["TorchvisionDetector"]

_EXPORTABLE = (RetinaNet, FCOS, FasterRCNN)


class TorchvisionDetector(Detector):
    """The protocol of a detector in torchvision's calling convention (a view: the model
    trains as it is)."""

    adapter = "torchvision"
    root = "backbone"
    taps = "backbone"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.family = _family(model)
        if not isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform):
            self.batch_path = None  # a user's detector: the backbone's input is the batch

    @property
    def detector(self) -> nn.Module:
        return self.model

    @property
    def num_classes(self) -> int | None:
        head = getattr(getattr(self.model, "head", None), "classification_head", None)
        for value in (getattr(head, "num_classes", None), getattr(head, "num_columns", None)):
            if isinstance(value, int):
                return value
        score = getattr(getattr(getattr(self.model, "roi_heads", None), "box_predictor", None),
                        "cls_score", None)
        return int(score.out_features) if isinstance(score, nn.Linear) else None

    def check_exportable(self) -> None:
        name = type(self.model).__name__
        if not isinstance(self.model, _EXPORTABLE):
            raise ValueError(f"model of type {name} cannot be exported; expected a torchvision "
                             "RetinaNet, FCOS or FasterRCNN (e.g. from build_detector), or a "
                             "detector of another family wrapped by structkd (as_detector)")
        roi = getattr(self.model, "roi_heads", None)
        if roi is not None and (getattr(roi, "mask_roi_pool", None) is not None
                                or getattr(roi, "keypoint_roi_pool", None) is not None):
            raise ValueError(f"model {name} has mask/keypoint heads; only box detectors (boxes, "
                             "scores, labels) are exported")


def _family(model: nn.Module) -> str:
    """By the class name: torchvision's (FCOS, RetinaNet, SSD, FasterRCNN, MaskRCNN) and a
    user's own class named after one."""
    name = type(model).__name__.lower()
    for family in ("fcos", "retinanet", "ssdlite", "ssd"):
        if family in name:
            return family
    return "fasterrcnn" if "rcnn" in name else "custom"


def _identity(model: nn.Module, **options: Any) -> nn.Module:
    return model


register_adapter(Adapter("torchvision", accepts=lambda model: isinstance(model, nn.Module),
                         wrap=_identity, view=TorchvisionDetector, fallback=True))
