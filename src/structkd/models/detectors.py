"""Build torchvision detectors (RetinaNet, FCOS, Faster R-CNN) from a small, JSON-serialisable spec.

The spec describes everything needed to rebuild a model: architecture, backbone, FPN width, input
resizing, normalisation and (optionally) the torchvision weights it was initialised from. Students
are exported as ``<prefix>.safetensors`` + ``<prefix>.json`` and rebuilt from those two files only.

Conventions (identical for all architectures): label 0 is the background, object labels are
``1..K`` and ``num_classes = K + 1``.

Neck levels (keys of ``model.backbone(images)``; the distillation loss runs on all of them):

* RetinaNet / FCOS: FPN on C3-C5 plus P6/P7, keys ``'0', '1', '2', 'p6', 'p7'``, strides 8..128.
* Faster R-CNN: FPN on C2-C5 plus a max-pooled level, keys ``'0', '1', '2', '3', 'pool'``, strides
  4..64.

For MobileNetV3 the FPN is built on the *last* block of each resolution stage, so its levels have
the same keys and strides as the ResNet ones and a MobileNet student can be distilled from a ResNet
teacher level by level. torchvision's own ``fasterrcnn_mobilenet_v3_large_fpn`` layout (two levels
at stride 32 plus a pooled level at 64) is available as ``variant="tv_mobilenet"``, which is needed
to load its COCO weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import socket
import statistics
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.fcos import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = [
    "ARCHS",
    "BACKBONES",
    "NORMS",
    "VARIANTS",
    "DetectorSpec",
    "build_detector",
    "count_parameters",
    "export_student",
    "load_exported",
    "load_torchvision_weights",
    "measure_latency",
    "neck_channels",
    "neck_strides",
    "spec_from_json",
    "spec_to_json",
]

ARCHS = ("retinanet", "fcos", "fasterrcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
NORMS = ("bn", "frozen_bn", "gn")
VARIANTS = ("v1", "v2", "tv_mobilenet")

EXPORT_FORMAT = "structkd-detector"
DOWNLOAD_TIMEOUT_S = 10.0

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
# Layers that depend on num_classes; they stay freshly initialised when fine-tuning COCO weights.
_CLASS_SPECIFIC_PREFIXES: dict[str, tuple[str, ...]] = {
    "retinanet": ("head.classification_head.cls_logits.",),
    "fcos": ("head.classification_head.cls_logits.",),
    "fasterrcnn": ("roi_heads.box_predictor.",),
}
# torchvision's defaults, made explicit so that an exported spec pins them.
_DEFAULT_SCORE_THRESH = {"retinanet": 0.05, "fcos": 0.2, "fasterrcnn": 0.05}
_DEFAULT_DETECTIONS = {"retinanet": 300, "fcos": 100, "fasterrcnn": 100}
_WEIGHT_EXAMPLES = (
    "'RetinaNet_ResNet50_FPN_Weights.COCO_V1', 'FCOS_ResNet50_FPN_Weights.COCO_V1', "
    "'FasterRCNN_ResNet50_FPN_Weights.COCO_V1' (detectors) or 'ResNet50_Weights.IMAGENET1K_V1', "
    "'MobileNet_V3_Large_Weights.IMAGENET1K_V1' (backbones)"
)


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


def _resolve_weight(name: str, argument: str) -> torchvision.models.WeightsEnum:
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


def _is_mobilenet(backbone: str) -> bool:
    return backbone.startswith("mobilenet")


def _max_trainable_layers(backbone: str) -> int:
    """Number of freezable stages: 5 for ResNet (conv1, layer1..4), 6 for MobileNetV3."""
    return 6 if _is_mobilenet(backbone) else 5


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
            enum_name = type(_resolve_weight(self.weights, "weights")).__name__
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
            enum_name = type(_resolve_weight(self.backbone_weights, "backbone_weights")).__name__
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
        if variant == "v2" and (_is_mobilenet(self.backbone) or self.arch == "fcos"):
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


def neck_strides(spec: DetectorSpec | Mapping[str, Any]) -> dict[str, int]:
    """Neck output keys -> stride (in pixels of the resized input) for a spec, in output order."""
    spec = _as_spec(spec).resolved()
    if spec.arch in ("retinanet", "fcos"):
        return {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128}
    if spec.variant == "tv_mobilenet":
        return {"0": 32, "1": 32, "pool": 64}
    return {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}


def _as_spec(spec: DetectorSpec | Mapping[str, Any] | None, **kwargs: Any) -> DetectorSpec:
    if spec is None:
        return DetectorSpec.from_dict(kwargs)
    if isinstance(spec, DetectorSpec):
        return DetectorSpec.from_dict({**spec.to_dict(), **kwargs}) if kwargs else spec
    if isinstance(spec, Mapping):
        return DetectorSpec.from_dict({**spec, **kwargs})
    raise ValueError(f"spec={spec!r} is invalid; expected a DetectorSpec, a dict or None")


# --------------------------------------------------------------------------------------------
# Weights (offline-safe)
# --------------------------------------------------------------------------------------------


def load_torchvision_weights(
    name: str, *, timeout: float = DOWNLOAD_TIMEOUT_S
) -> dict[str, torch.Tensor]:
    """State dict of torchvision weights ``name``, from torch.hub's cache or downloaded.

    Offline, the download fails fast (socket timeout ``timeout`` seconds) with a ``RuntimeError``
    telling where to put the file by hand. Checkpoints are read with ``weights_only=True``.
    """
    weights = _resolve_weight(name, "weights")
    url = weights.url
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / os.path.basename(urllib.parse.urlparse(url).path)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # process-wide while downloading; urllib has no other hook
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as err:
        raise RuntimeError(
            f"could not download torchvision weights {name!r} from {url} ({type(err).__name__}: "
            f"{err}). Without internet access, download that file elsewhere and put it at "
            f"{cached} (the torch.hub cache: $TORCH_HOME/hub/checkpoints, TORCH_HOME defaults to "
            "~/.cache/torch)"
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def _load_detector_weights(
    model: nn.Module, spec: DetectorSpec, state: dict[str, torch.Tensor]
) -> None:
    """Load COCO detector weights; with another num_classes, skip the class-specific layers."""
    assert spec.weights is not None
    coco_classes = len(_resolve_weight(spec.weights, "weights").meta["categories"])
    skipped: tuple[str, ...] = ()
    if spec.num_classes != coco_classes:
        skipped = _CLASS_SPECIFIC_PREFIXES[spec.arch]
        state = {k: v for k, v in state.items() if not k.startswith(skipped)}
    try:
        result = model.load_state_dict(state, strict=not skipped)
    except RuntimeError as err:
        raise ValueError(
            f"weights={spec.weights!r} do not fit the model built from the spec (check "
            f"fpn_channels={spec.fpn_channels}, expected 256 for torchvision weights): {err}"
        ) from err
    bad_missing = [k for k in result.missing_keys if not k.startswith(skipped)]
    if bad_missing or result.unexpected_keys:
        raise ValueError(
            f"weights={spec.weights!r} do not fit the model built from the spec: missing "
            f"{bad_missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where possible (torchvision's choice), else ``gcd(32, C)`` groups.

    At least two channels per group, so a 1x1 map (P7 of a small image) still normalises.
    """
    groups = math.gcd(32, num_channels)
    if groups == num_channels and num_channels > 1:
        groups //= 2
    return nn.GroupNorm(groups, num_channels)


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    return {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d, "gn": _group_norm}[norm]


class _P6P7(LastLevelP6P7):
    """torchvision's P6/P7 block with the input (P5 or C5) chosen explicitly.

    torchvision infers "use P5" from ``in_channels == out_channels``, which silently picks the
    wrong input when C5 happens to have the FPN width (e.g. ResNet-18 with a 512-wide FPN).
    """

    def __init__(self, in_channels: int, out_channels: int, *, from_p5: bool) -> None:
        super().__init__(in_channels, out_channels)
        self.use_P5 = from_p5


def _freeze(modules: list[nn.Module]) -> None:
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def _build_backbone(spec: DetectorSpec) -> BackboneWithFPN:
    """Body (ResNet / MobileNetV3 trunk) + FPN of width ``spec.fpn_channels``."""
    norm_layer = _norm_layer(spec.norm)  # type: ignore[arg-type]
    two_stage = spec.arch == "fasterrcnn"
    trainable = spec.trainable_backbone_layers
    assert trainable is not None
    if _is_mobilenet(spec.backbone):
        net = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm_layer)
        if spec.backbone_weights is not None:
            net.load_state_dict(load_torchvision_weights(spec.backbone_weights))
        body = net.features
        # torchvision's stage boundaries: the stem, every strided block, and the last conv.
        starts = [0] + [i for i, b in enumerate(body) if getattr(b, "_is_cn", False)]
        starts.append(len(body) - 1)
        n_stages = len(starts)
        freeze_before = len(body) if trainable == 0 else starts[n_stages - trainable]
        _freeze(list(body[:freeze_before]))
        if spec.variant == "tv_mobilenet":
            indices = [starts[-2], starts[-1]]  # both at stride 32, as torchvision does
        else:
            # The last block of every stride stage (4, 8, 16, 32), like ResNet's layer1..4.
            strided = starts[1:-1]
            indices = [nxt - 1 for nxt in strided[1:]] + [len(body) - 1]
            indices = indices if two_stage else indices[1:]
        in_channels = [body[i].out_channels for i in indices]
        return_layers = {str(idx): str(level) for level, idx in enumerate(indices)}
    else:
        net = torchvision.models.get_model(spec.backbone, weights=None, norm_layer=norm_layer)
        if spec.backbone_weights is not None:
            net.load_state_dict(load_torchvision_weights(spec.backbone_weights))
        body = net
        trainable_names = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
        if trainable == 5:
            trainable_names.append("bn1")
        for name, parameter in net.named_parameters():
            if not name.startswith(tuple(trainable_names)):
                parameter.requires_grad_(False)
        stages = [1, 2, 3, 4] if two_stage else [2, 3, 4]
        width2 = net.inplanes // 8  # C2 channels: 64 (basic block) or 256 (bottleneck)
        in_channels = [width2 * 2 ** (s - 1) for s in stages]
        return_layers = {f"layer{s}": str(level) for level, s in enumerate(stages)}

    extra: ExtraFPNBlock
    if two_stage:
        extra = LastLevelMaxPool()
    elif spec.variant == "v2":
        extra = _P6P7(in_channels[-1], spec.fpn_channels, from_p5=False)
    else:
        extra = _P6P7(spec.fpn_channels, spec.fpn_channels, from_p5=True)
    fpn_norm = nn.BatchNorm2d if (two_stage and spec.variant == "v2") else None
    return BackboneWithFPN(
        body, return_layers, in_channels, spec.fpn_channels, extra_blocks=extra, norm_layer=fpn_norm
    )


def _anchor_generator(spec: DetectorSpec, n_levels: int) -> AnchorGenerator:
    base = spec.anchor_size or 32
    octaves = tuple(base * 2**i for i in range(5))
    if spec.arch == "retinanet":
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in octaves)
        ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    elif spec.arch == "fcos":
        sizes = (
            (8,),
            (16,),
            (32,),
            (64,),
            (128,),
        )  # one "anchor" per location, equal to the stride
        ratios = ((1.0,),) * len(sizes)
    elif spec.variant == "tv_mobilenet":
        sizes = (octaves,) * n_levels
        ratios = ((0.5, 1.0, 2.0),) * n_levels
    else:
        sizes = tuple((s,) for s in octaves)
        ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    if len(sizes) != n_levels:  # would fail deep inside torchvision otherwise
        raise AssertionError(f"anchor generator has {len(sizes)} levels, the neck {n_levels}")
    return AnchorGenerator(sizes, ratios)


def _fcos_head(channels: int, num_classes: int) -> FCOSHead:
    if _group_norm(channels).num_groups == 32:
        return FCOSHead(channels, 1, num_classes)
    # torchvision hard-codes GroupNorm(32, C); build the towers with a norm that fits C.
    head = FCOSHead(32, 1, num_classes, num_convs=0)
    head.classification_head = FCOSClassificationHead(
        channels, 1, num_classes, norm_layer=_group_norm
    )
    head.regression_head = FCOSRegressionHead(channels, 1, norm_layer=_group_norm)
    return head


def build_detector(
    spec: DetectorSpec | Mapping[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """Build a torchvision RetinaNet / FCOS / Faster R-CNN described by ``spec``.

    ``spec`` may be a :class:`DetectorSpec`, a dict, or ``None`` (then ``kwargs`` are the spec);
    ``kwargs`` override fields of a given spec. The resolved spec is attached as
    ``model.structkd_spec``.

    Weights: ``backbone_weights`` loads ImageNet weights into the trunk. ``weights`` loads a
    torchvision COCO detector; when ``num_classes`` differs from the checkpoint's 91, everything
    except the class-specific output layers (RetinaNet/FCOS ``cls_logits``, Faster R-CNN
    ``box_predictor``) is loaded and those stay freshly initialised -- the way to fine-tune a COCO
    detector into a teacher for another label set. Downloads fail fast offline (``RuntimeError``
    naming the file and the cache directory where it can be placed by hand).
    """
    spec = _as_spec(spec, **kwargs).resolved()
    # Fetch first: an offline failure should not wait for the model to be built.
    state = load_torchvision_weights(spec.weights) if spec.weights is not None else None
    backbone = _build_backbone(spec)
    n_levels = len(neck_strides(spec))
    anchors = _anchor_generator(spec, n_levels)
    channels = spec.fpn_channels
    common: dict[str, Any] = {"min_size": spec.min_size, "max_size": spec.max_size}
    model: nn.Module
    if spec.arch == "retinanet":
        head_norm = _group_norm if spec.variant == "v2" else None
        head = RetinaNetHead(
            channels, anchors.num_anchors_per_location()[0], spec.num_classes, norm_layer=head_norm
        )
        if spec.variant == "v2":
            head.regression_head._loss_type = "giou"
        model = RetinaNet(
            backbone,
            spec.num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=spec.score_thresh,
            detections_per_img=spec.detections_per_img,
            **common,
            **spec.detector_kwargs,
        )
    elif spec.arch == "fcos":
        model = FCOS(
            backbone,
            spec.num_classes,
            anchor_generator=anchors,
            head=_fcos_head(channels, spec.num_classes),
            score_thresh=spec.score_thresh,
            detections_per_img=spec.detections_per_img,
            **common,
            **spec.detector_kwargs,
        )
    else:
        roi_levels = [k for k in neck_strides(spec) if k != "pool"]
        extra_heads: dict[str, Any] = {}
        if spec.variant == "v2":
            extra_heads["rpn_head"] = RPNHead(
                channels, anchors.num_anchors_per_location()[0], conv_depth=2
            )
            extra_heads["box_head"] = FastRCNNConvFCHead(
                (channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d
            )
        model = FasterRCNN(
            backbone,
            spec.num_classes,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=2),
            box_score_thresh=spec.score_thresh,
            box_detections_per_img=spec.detections_per_img,
            **extra_heads,
            **common,
            **spec.detector_kwargs,
        )
    if state is not None:
        _load_detector_weights(model, spec, state)
    model.structkd_spec = spec
    return model


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of (unique) parameters, optionally only those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def neck_channels(model: nn.Module) -> int:
    """FPN width of a torchvision detector (``model.backbone.out_channels``)."""
    channels = getattr(getattr(model, "backbone", None), "out_channels", None)
    if not isinstance(channels, int):
        raise ValueError(
            f"model of type {type(model).__name__} has no backbone.out_channels; expected a "
            "torchvision detector built by build_detector"
        )
    return channels


def _export_spec(spec: DetectorSpec) -> DetectorSpec:
    """Resolved spec that rebuilds the same architecture without downloading anything."""
    return dataclasses.replace(spec.resolved(), weights=None, backbone_weights=None)


def export_student(
    model: nn.Module,
    spec: DetectorSpec | Mapping[str, Any],
    path_prefix: str | os.PathLike,
    extra_meta: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<prefix>.safetensors`` (the detector's weights only) and ``<prefix>.json``.

    The JSON holds the resolved spec (weight names moved to ``meta['init_weights']`` so rebuilding
    never downloads), the structkd version and ``extra_meta`` (e.g. class names). The state dict
    must match the spec exactly, so a distillation wrapper holding a teacher is rejected.
    """
    from structkd import __version__

    spec = _as_spec(spec)
    state = model.state_dict()
    teacher_keys = [k for k in state if "teacher" in k]
    if teacher_keys:
        raise ValueError(
            f"model has teacher weights ({teacher_keys[:3]}...); expected the student detector only"
        )
    rebuilt_spec = _export_spec(spec)
    reference = build_detector(rebuilt_spec).state_dict()
    shape_of = {k: tuple(v.shape) for k, v in reference.items()}
    if shape_of != {k: tuple(v.shape) for k, v in state.items()}:
        missing = sorted(set(shape_of) - set(state))[:5]
        unexpected = sorted(set(state) - set(shape_of))[:5]
        raise ValueError(
            f"model state does not match spec (arch={spec.arch!r}, backbone={spec.backbone!r}): "
            f"missing {missing}, unexpected {unexpected}, or differing shapes"
        )
    # clone(): own, contiguous storage per tensor, so tied/shared tensors cannot trip safetensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "structkd_version": __version__,
        "torchvision_version": torchvision.__version__,
        "init_weights": spec.weights or spec.backbone_weights,
        **dict(extra_meta or {}),
    }
    document = {"spec": rebuilt_spec.to_dict(), "meta": meta}
    text = json.dumps(document, indent=2, sort_keys=True)
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    weights_path = prefix.with_name(prefix.name + ".safetensors")
    json_path = prefix.with_name(prefix.name + ".json")

    from safetensors.torch import save_file

    save_file(tensors, str(weights_path), metadata={"format": EXPORT_FORMAT, "structkd": text})
    json_path.write_text(text + "\n")
    return weights_path, json_path


def load_exported(
    path_prefix: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, DetectorSpec, dict[str, Any]]:
    """Rebuild a model written by :func:`export_student`; returns ``(model, spec, meta)``.

    The model is returned in eval mode.
    """
    from safetensors.torch import load_file

    prefix = Path(path_prefix)
    json_path = prefix.with_name(prefix.name + ".json")
    weights_path = prefix.with_name(prefix.name + ".safetensors")
    for path in (json_path, weights_path):
        if not path.is_file():
            raise ValueError(f"path_prefix={str(prefix)!r}: {path} does not exist")
    document = json.loads(json_path.read_text())
    if not isinstance(document, dict) or document.get("meta", {}).get("format") != EXPORT_FORMAT:
        raise ValueError(f"{json_path} is not a structkd export; expected format {EXPORT_FORMAT!r}")
    spec = DetectorSpec.from_dict(document["spec"])
    model = build_detector(spec)
    model.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
    return model.to(device).eval(), spec, document["meta"]


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    image_size: int,
    *,
    device: str | torch.device = "cpu",
    batch: int = 1,
    warmup: int = 2,
    iters: int = 10,
) -> float:
    """Median eval-mode latency in milliseconds per image on random ``image_size``² images.

    Includes torchvision's internal resize/normalise and post-processing (the deployed path).
    The model is moved to ``device`` and its train/eval mode restored afterwards.
    """
    for name, value, minimum in (
        ("image_size", image_size, 1),
        ("batch", batch, 1),
        ("warmup", warmup, 0),
        ("iters", iters, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} is invalid; expected an int >= {minimum}")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, image_size, image_size, generator=generator).to(device) for _ in range(batch)
    ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[float] = []
    try:
        for step in range(warmup + iters):
            sync()
            start = time.perf_counter()
            model(images)
            sync()
            if step >= warmup:
                times.append((time.perf_counter() - start) * 1000.0 / batch)
    finally:
        model.train(was_training)
    return statistics.median(times)
