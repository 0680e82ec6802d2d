"""What describes a detector: a small, JSON-serialisable spec (``DetectorSpec``).

The spec holds everything needed to rebuild a model: architecture, backbone, FPN width, input
resizing, normalisation and (optionally) the torchvision weights it was initialised from.

Conventions (identical for all architectures): label 0 is the background, object labels are
``1..K`` and ``num_classes = K + 1``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torchvision

__all__ = ["ARCHS", "BACKBONES", "NORMS", "VARIANTS", "DetectorSpec", "as_spec",
           "spec_from_json", "spec_to_json"]

ARCHS = ("retinanet", "fcos", "fasterrcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
NORMS = ("bn", "frozen_bn", "gn")
VARIANTS = ("v1", "v2", "tv_mobilenet")

# torchvision detector weight enums -> (arch, backbone, variant) they were trained with.
_DETECTOR_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "RetinaNet_ResNet50_FPN_Weights": ("retinanet", "resnet50", "v1"),
    "RetinaNet_ResNet50_FPN_V2_Weights": ("retinanet", "resnet50", "v2"),
    "FCOS_ResNet50_FPN_Weights": ("fcos", "resnet50", "v1"),
    "FasterRCNN_ResNet50_FPN_Weights": ("fasterrcnn", "resnet50", "v1"),
    "FasterRCNN_ResNet50_FPN_V2_Weights": ("fasterrcnn", "resnet50", "v2"),
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": (
        "fasterrcnn",
        "mobilenet_v3_large",
        "tv_mobilenet",
    ),
    "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights": (
        "fasterrcnn",
        "mobilenet_v3_large",
        "tv_mobilenet",
    ),
}
# torchvision classification weight enums -> backbone name.
_BACKBONE_WEIGHTS: dict[str, str] = {
    "ResNet18_Weights": "resnet18",
    "ResNet34_Weights": "resnet34",
    "ResNet50_Weights": "resnet50",
    "ResNet101_Weights": "resnet101",
    "MobileNet_V3_Large_Weights": "mobilenet_v3_large",
}
# torchvision's defaults, made explicit so that an exported spec pins them.
_DEFAULT_SCORE_THRESH = {"retinanet": 0.05, "fcos": 0.2, "fasterrcnn": 0.05}
_DEFAULT_DETECTIONS = {"retinanet": 300, "fcos": 100, "fasterrcnn": 100}
_WEIGHT_EXAMPLES = (
    "'RetinaNet_ResNet50_FPN_Weights.COCO_V1', 'FCOS_ResNet50_FPN_Weights.COCO_V1', "
    "'FasterRCNN_ResNet50_FPN_Weights.COCO_V1' (detectors) or 'ResNet50_Weights.IMAGENET1K_V1', "
    "'MobileNet_V3_Large_Weights.IMAGENET1K_V1' (backbones)"
)


def resolve_weight(name: str, argument: str) -> torchvision.models.WeightsEnum:
    """Resolve a torchvision weight enum name such as ``'ResNet50_Weights.IMAGENET1K_V1'``."""
    if not isinstance(name, str) or name.count(".") != 1:
        raise ValueError(
            f"{argument}={name!r} is not a torchvision weight name 'EnumClass.MEMBER'; "
            f"expected e.g. {_WEIGHT_EXAMPLES}"
        )
    try:
        return torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(
            f"{argument}={name!r} is not a known torchvision weight name; expected e.g. "
            f"{_WEIGHT_EXAMPLES}"
        ) from err


def is_mobilenet(backbone: str) -> bool:
    return backbone.startswith("mobilenet")


def _max_trainable_layers(backbone: str) -> int:
    """Number of freezable stages: 5 for ResNet (conv1, layer1..4), 6 for MobileNetV3."""
    return 6 if is_mobilenet(backbone) else 5


@dataclass
class DetectorSpec:
    """Everything needed to rebuild a detector; JSON round-trippable (``to_dict``/``from_dict``).

    Fields left at ``None`` are resolved by :meth:`resolved` (and thus by :func:`build_detector`):

    * ``norm``: ``"bn"`` (trainable BatchNorm) when training from scratch, ``"frozen_bn"`` with
      pretrained weights. ``"gn"``: GroupNorm, 32 groups where the width allows (scratch only).
    * ``trainable_backbone_layers``: every stage from scratch (5 ResNet, 6 MobileNetV3), 3 with
      pretrained weights (torchvision's default).
    * ``variant``: taken from ``weights`` when given, else ``"v1"``. ``"v1"``: torchvision's first
      recipe (P6/P7 computed from P5). ``"v2"``: the ``*_v2`` recipe for ResNet RetinaNet (GroupNorm
      head, GIoU loss, P6 from C5) and Faster R-CNN (BatchNorm FPN, two-conv RPN head, 4conv-1fc box
      head). ``"tv_mobilenet"``: torchvision's MobileNetV3 Faster R-CNN level layout.
    * ``score_thresh`` / ``detections_per_img``: torchvision's per-architecture defaults.
    * ``anchor_size``: RetinaNet / Faster R-CNN anchor size (pixels of the resized input) at
      the finest neck level, doubling per level; torchvision's 32 (made for 800 px inputs).
      Small inputs need smaller anchors (e.g. 16 at 128-256 px), or small objects match none.
      FCOS has no anchors (its locations equal the strides) and takes ``None`` only.

    ``weights`` names a torchvision detector weight enum (teacher use), ``backbone_weights`` an
    ImageNet classification weight enum; at most one of them may be set. ``detector_kwargs`` are
    passed on to the torchvision detector class (e.g. ``nms_thresh``, ``rpn_score_thresh``).
    """

    arch: str
    num_classes: int
    backbone: str = "resnet50"
    fpn_channels: int = 256
    min_size: int = 800
    max_size: int = 1333
    weights: str | None = None
    backbone_weights: str | None = None
    trainable_backbone_layers: int | None = None
    norm: str | None = None
    variant: str | None = None
    score_thresh: float | None = None
    detections_per_img: int | None = None
    anchor_size: int | None = None
    detector_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is not supported; expected one of {ARCHS}")
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"backbone={self.backbone!r} is not supported; expected one of {BACKBONES}"
            )
        for name in ("num_classes", "fpn_channels", "min_size", "max_size"):
            value = getattr(self, name)
            minimum = 2 if name == "num_classes" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                extra = " (background + at least one class)" if name == "num_classes" else ""
                raise ValueError(
                    f"{name}={value!r} is invalid; expected an int >= {minimum}{extra}"
                )
        a = self.anchor_size
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ValueError(f"anchor_size={a!r} is invalid; expected an int >= 1 or None")
        if a is not None and self.arch == "fcos":
            raise ValueError(
                f"anchor_size={a!r} does not apply to arch='fcos' (anchor-free); expected None"
            )
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(
                f"norm={self.norm!r} is not supported; expected one of {NORMS} or None"
            )
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(
                f"variant={self.variant!r} is not supported; expected one of {VARIANTS} or None"
            )
        if not isinstance(self.detector_kwargs, Mapping):
            raise ValueError(
                f"detector_kwargs={self.detector_kwargs!r} is invalid; expected a dict"
            )
        self.detector_kwargs = dict(self.detector_kwargs)
        tbl = self.trainable_backbone_layers
        max_tbl = _max_trainable_layers(self.backbone)
        if tbl is not None and (
            isinstance(tbl, bool) or not isinstance(tbl, int) or not 0 <= tbl <= max_tbl
        ):
            raise ValueError(
                f"trainable_backbone_layers={tbl!r} is invalid for backbone {self.backbone!r}; "
                f"expected an int in [0, {max_tbl}] or None"
            )
        if self.weights is not None and self.backbone_weights is not None:
            raise ValueError(
                f"weights={self.weights!r} and backbone_weights={self.backbone_weights!r} are "
                "both set; expected at most one (detector weights already contain the backbone)"
            )
        if self.weights is not None:
            enum_name = type(resolve_weight(self.weights, "weights")).__name__
            if enum_name not in _DETECTOR_WEIGHTS:
                raise ValueError(
                    f"weights={self.weights!r} are not detector weights supported here; expected "
                    f"one of the enums {sorted(_DETECTOR_WEIGHTS)}"
                )
            arch, backbone, variant = _DETECTOR_WEIGHTS[enum_name]
            if (arch, backbone) != (self.arch, self.backbone):
                raise ValueError(
                    f"weights={self.weights!r} belong to arch={arch!r}, backbone={backbone!r}; "
                    f"expected them to match the spec (arch={self.arch!r}, "
                    f"backbone={self.backbone!r})"
                )
            if self.variant is not None and self.variant != variant:
                raise ValueError(
                    f"variant={self.variant!r} does not match weights={self.weights!r}; "
                    f"expected variant={variant!r} or None"
                )
        if self.backbone_weights is not None:
            enum_name = type(resolve_weight(self.backbone_weights, "backbone_weights")).__name__
            if _BACKBONE_WEIGHTS.get(enum_name) != self.backbone:
                raise ValueError(
                    f"backbone_weights={self.backbone_weights!r} do not fit backbone="
                    f"{self.backbone!r}; expected an enum of "
                    f"{[k for k, v in _BACKBONE_WEIGHTS.items() if v == self.backbone]}"
                )
        if self.pretrained and self.norm == "gn":
            raise ValueError(
                "norm='gn' cannot load pretrained BatchNorm weights; expected norm 'bn', "
                "'frozen_bn' or None when weights or backbone_weights are set"
            )
        variant = self.variant
        if variant == "v2" and (is_mobilenet(self.backbone) or self.arch == "fcos"):
            raise ValueError(
                f"variant='v2' exists for ResNet RetinaNet/Faster R-CNN only, got arch="
                f"{self.arch!r}, backbone={self.backbone!r}; expected variant 'v1'"
            )
        if variant == "tv_mobilenet" and (
            self.arch != "fasterrcnn" or self.backbone != "mobilenet_v3_large"
        ):
            raise ValueError(
                f"variant='tv_mobilenet' needs arch='fasterrcnn' and backbone="
                f"'mobilenet_v3_large', got arch={self.arch!r}, backbone={self.backbone!r}"
            )

    @property
    def pretrained(self) -> bool:
        """Whether any pretrained weights (detector or backbone) are loaded."""
        return self.weights is not None or self.backbone_weights is not None

    def resolved(self) -> DetectorSpec:
        """A copy with every ``None`` default replaced by the concrete value used to build."""
        variant = self.variant
        if variant is None:
            variant = "v1"
            if self.weights is not None:
                variant = _DETECTOR_WEIGHTS[self.weights.split(".")[0]][2]
        tbl = self.trainable_backbone_layers
        if tbl is None:
            tbl = 3 if self.pretrained else _max_trainable_layers(self.backbone)
        return dataclasses.replace(
            self,
            norm=self.norm or ("frozen_bn" if self.pretrained else "bn"),
            variant=variant,
            trainable_backbone_layers=tbl,
            score_thresh=(
                _DEFAULT_SCORE_THRESH[self.arch]
                if self.score_thresh is None
                else float(self.score_thresh)
            ),
            detections_per_img=(
                _DEFAULT_DETECTIONS[self.arch]
                if self.detections_per_img is None
                else self.detections_per_img
            ),
            anchor_size=(
                self.anchor_size if self.anchor_size is not None or self.arch == "fcos" else 32
            ),
            detector_kwargs=copy.deepcopy(self.detector_kwargs),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"spec={data!r} is invalid; expected a dict or DetectorSpec")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown DetectorSpec keys {unknown}; expected keys from {sorted(known)}"
            )
        missing = [k for k in ("arch", "num_classes") if k not in data]
        if missing:
            raise ValueError(f"DetectorSpec is missing required keys {missing}")
        return cls(**data)


def spec_to_json(spec: DetectorSpec, path: str | os.PathLike) -> None:
    """Write a spec as JSON."""
    Path(path).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")


def spec_from_json(path: str | os.PathLike) -> DetectorSpec:
    """Read a spec written by :func:`spec_to_json`."""
    return DetectorSpec.from_dict(json.loads(Path(path).read_text()))


def as_spec(spec: DetectorSpec | Mapping[str, Any] | None, **kwargs: Any) -> DetectorSpec:
    if spec is None:
        return DetectorSpec.from_dict(kwargs)
    if isinstance(spec, DetectorSpec):
        return DetectorSpec.from_dict({**spec.to_dict(), **kwargs}) if kwargs else spec
    if isinstance(spec, Mapping):
        return DetectorSpec.from_dict({**spec, **kwargs})
    raise ValueError(f"spec={spec!r} is invalid; expected a DetectorSpec, a dict or None")
