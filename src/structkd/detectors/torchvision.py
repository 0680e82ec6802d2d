"""torchvision's detectors, and a user's detector in torchvision's calling convention, as they
are: trained without a wrapper, seen through a :class:`TorchvisionDetector` view.

The family comes from the model's class name (RetinaNet, FCOS, Faster R-CNN, SSD, SSDlite; anything
else is "custom"); the batch is the output of its ``GeneralizedRCNNTransform`` (``transform``),
or, for a detector without one, the input of its ``backbone``; the default taps are the
backbone's output (trunk + FPN). Exported as ONNX: RetinaNet, FCOS and Faster R-CNN.

Head outputs (RetinaNet, FCOS and a user's detector built like them: a ``head`` returning
``cls_logits`` and ``bbox_regression`` over its ``anchor_generator``'s anchors): the box codes
are decoded by the model's own ``box_coder`` arithmetic into distances from each location's
centre; FCOS's centre-ness is the levels' quality logit. The classifier's column 0 (the
background's, never a target of these sigmoid heads) is left out: a level's logits are the
object classes 1..K, as every family's are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..methods.context import HeadLevel
from .protocol import Detector, HeadInfo
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
        if _dense(model):
            self.head_path = "head"

    def head_info(self) -> HeadInfo:
        name = type(self.model).__name__
        if not _dense(self.model):
            return HeadInfo(None, name=name, why=(
                f"{name} has no dense head structkd reads (RetinaNet- or FCOS-like: a 'head' "
                "with cls_logits and bbox_regression over an anchor_generator's anchors)"))
        cells = self.model.anchor_generator.cell_anchors
        return HeadInfo("dense", bins=0, anchors=int(cells[0].shape[0]), name=name,
                        why=f"{name}'s head predicts box offsets, not distributions")

    def _branches(self) -> dict[str, tuple[str, nn.Module, list[int]]]:
        """Each head branch: its attribute, the module, the start of each of its layers (a
        conv block) in the branch's ``conv`` sequence."""
        head = self.model.head
        out = {}
        for key, attr in (("cls", "classification_head"), ("reg", "regression_head")):
            branch = getattr(head, attr, None)
            conv = getattr(branch, "conv", None)
            if not isinstance(conv, nn.Sequential):
                raise ValueError(f"{type(self.model).__name__}'s {attr} has no 'conv' sequence "
                                 "of layers to cut (CrossKD)")
            starts = [i for i, m in enumerate(conv) if isinstance(m, nn.Conv2d)
                      or any(isinstance(c, nn.Conv2d) for c in m.children())]
            out[key] = (attr, branch, starts)
        return out

    def cross_cuts(self, cut: int) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for key, (attr, branch, starts) in self._branches().items():
            if not 0 <= cut <= len(starts):
                raise ValueError(f"cut={cut}; {type(self.model).__name__}'s {attr} has "
                                 f"{len(starts)} layers: expected 0..{len(starts)}")
            end = starts[cut] if cut < len(starts) else len(branch.conv)
            out[key] = None if end == 0 else f"head.{attr}.conv.{end - 1}"
        return out

    def run_head_from(self, cut: int, inputs: dict[str, list[Tensor]]) -> Any:
        outputs = {}
        for key, (_attr, branch, starts) in self._branches().items():
            start = starts[cut] if cut < len(starts) else len(branch.conv)
            whole = branch.conv
            branch.conv = nn.Sequential(*list(whole)[start:])  # the same layers, from the cut
            try:
                outputs[key] = branch(inputs[key])
            finally:
                branch.conv = whole
        reg = outputs["reg"]
        raw = {"cls_logits": outputs["cls"]}
        if isinstance(reg, tuple):  # FCOS: (boxes, centre-ness)
            raw["bbox_regression"], raw["bbox_ctrness"] = reg
        else:
            raw["bbox_regression"] = reg
        return raw

    def head_levels(self, raw: Any, levels: Sequence[Tensor],
                    batch_shape: tuple[int, int]) -> list[HeadLevel]:
        model = self.model
        coder = model.box_coder
        cells = model.anchor_generator.cell_anchors
        sizes = [tuple(x.shape[-2:]) for x in levels]
        counts = [h * w * int(c.shape[0]) for (h, w), c in zip(sizes, cells, strict=False)]
        total = raw["cls_logits"].shape[1]
        if len(cells) < len(levels) or sum(counts) != total:
            raise ValueError(f"{type(model).__name__}'s head gave {total} predictions per "
                             f"image; its {len(levels)} levels {sizes} with anchors per "
                             f"location {[int(c.shape[0]) for c in cells]} make {sum(counts)}")
        parts = {k: v.split(counts, dim=1) for k, v in raw.items()
                 if k in ("cls_logits", "bbox_regression", "bbox_ctrness")}
        out = []
        for i, ((h, w), cell) in enumerate(zip(sizes, cells, strict=False)):
            a = int(cell.shape[0])

            def grid(x: Tensor, a: int = a, h: int = h, w: int = w) -> Tensor:
                # (B, H*W*A, C), location-major then anchor, -> (B, A, C, H, W)
                return x.reshape(x.shape[0], h, w, a, x.shape[-1]).permute(0, 3, 4, 1, 2)

            stride = nominal_stride(batch_shape, (h, w))
            codes = grid(parts["bbox_regression"][i])
            ltrb, centre = _ltrb(coder, codes, cell.to(codes.device, torch.float32))
            quality = grid(parts["bbox_ctrness"][i]) if "bbox_ctrness" in parts else None
            # Column 0 is the background's, which torchvision's sigmoid heads never train:
            # the levels hold the K object classes, in the order of labels 1..K.
            logits = grid(parts["cls_logits"][i])[:, :, 1:]
            out.append(HeadLevel(stride, logits, ltrb,
                                 offset=centre / stride, quality=quality))
        return out

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


def nominal_stride(batch_shape: tuple[int, int], size: tuple[int, int]) -> int:
    """A level's stride: the power of two its (rounded-up) size divides the batch by. (Where
    the batch is not a multiple of it, torchvision's anchor generator uses ``batch // size``
    per side instead, e.g. 48 and 64 for a 2 x 2 level of a 96 x 128 batch.)"""
    ratio = max(batch_shape[0] / size[0], batch_shape[1] / size[1])
    return 2 ** max(0, math.ceil(math.log2(ratio) - 1e-6))


def _dense(model: nn.Module) -> bool:
    """Whether ``model`` has a dense head structkd decodes (RetinaNet, FCOS, or built alike)."""
    head = getattr(model, "head", None)
    return (head is not None and hasattr(head, "classification_head")
            and hasattr(head, "regression_head")
            and hasattr(getattr(model, "anchor_generator", None), "cell_anchors")
            and isinstance(getattr(model, "box_coder", None), BoxCoder | BoxLinearCoder))


def _ltrb(coder: Any, codes: Tensor, cell: Tensor) -> tuple[Tensor, float]:
    """(B, A, 4, H, W) box codes of a location's anchors ``cell`` (A, 4; centred near 0) ->
    distances from the location's centre to the box's edges, and that centre's offset from
    the cell's corner (pixels), by the coder's own arithmetic (torchvision's decode)."""
    centre = float((cell[0, 0] + cell[0, 2]) / 2)
    aw = (cell[:, 2] - cell[:, 0]).view(1, -1, 1, 1)
    ah = (cell[:, 3] - cell[:, 1]).view(1, -1, 1, 1)
    cx = ((cell[:, 0] + cell[:, 2]) / 2).view(1, -1, 1, 1) - centre
    cy = ((cell[:, 1] + cell[:, 3]) / 2).view(1, -1, 1, 1) - centre
    codes = codes.float()
    if isinstance(coder, BoxLinearCoder):  # FCOS: distances, in anchor sizes when normalised
        scale = (torch.stack([aw, ah, aw, ah], dim=2) if coder.normalize_by_size
                 else torch.ones_like(codes[:, :1]))
        d = codes * scale
        return torch.stack([d[:, :, 0] - cx, d[:, :, 1] - cy, d[:, :, 2] + cx,
                            d[:, :, 3] + cy], dim=2), centre
    wx, wy, ww, wh = coder.weights
    clip = getattr(coder, "bbox_xform_clip", math.log(1000.0 / 16))
    px = codes[:, :, 0] / wx * aw + cx
    py = codes[:, :, 1] / wy * ah + cy
    pw = torch.exp((codes[:, :, 2] / ww).clamp(max=clip)) * aw
    ph = torch.exp((codes[:, :, 3] / wh).clamp(max=clip)) * ah
    return torch.stack([pw / 2 - px, ph / 2 - py, px + pw / 2, py + ph / 2], dim=2), centre


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
