"""Build torchvision detectors (RetinaNet, FCOS, Faster R-CNN) from a ``DetectorSpec``.

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

import math
from collections.abc import Callable, Mapping
from typing import Any

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

from .spec import DetectorSpec, as_spec, is_mobilenet
from .weights import load_detector_weights, load_torchvision_weights

__all__ = ["build_detector", "count_parameters", "neck_channels"]


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
    if is_mobilenet(spec.backbone):
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


def _level_names(backbone: BackboneWithFPN) -> list[str]:
    """The keys of the neck's output, in order: one per FPN input, then the extra levels."""
    names = list(backbone.body.return_layers.values())
    extra = backbone.fpn.extra_blocks
    return names + (["p6", "p7"] if isinstance(extra, LastLevelP6P7) else ["pool"])


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
    spec = as_spec(spec, **kwargs).resolved()
    # Fetch first: an offline failure should not wait for the model to be built.
    state = load_torchvision_weights(spec.weights) if spec.weights is not None else None
    backbone = _build_backbone(spec)
    n_levels = len(_level_names(backbone))
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
        roi_levels = [k for k in _level_names(backbone) if k != "pool"]
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
        load_detector_weights(model, spec, state)
    model.structkd_spec = spec
    return model


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
