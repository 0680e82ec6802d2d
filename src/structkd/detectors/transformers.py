"""The DETR family of Hugging Face transformers (``*ForObjectDetection``) as structkd detectors.

The wrapper speaks torchvision's calling convention (see :mod:`structkd.detectors.protocol`):

* images are resized, normalised and padded by torchvision's ``GeneralizedRCNNTransform`` with
  the model's own normalisation (RT-DETR, RT-DETRv2, D-FINE, DEIMv2: none, pixels in [0, 1];
  DETR, Conditional and Deformable DETR: ImageNet mean and std), so the batched tensor the
  teacher and the taps see is the one the model sees;
* targets become the model's labels: ``class_labels`` = label - 1 (transformers has no
  background id) and ``boxes`` as (cx, cy, w, h) normalised by the padded batch's width and
  height; predictions are mapped back the same way (label + 1, pixels of the original image);
* the training losses are the model's ``loss_dict`` (which sums to its ``loss``), else its
  ``loss`` alone;
* predictions: with a softmax head (``num_labels + 1`` logits, the last one "no object": DETR,
  Conditional DETR's siblings with it) the best class per query; with a sigmoid head (RT-DETR,
  D-FINE, Deformable DETR, ...) the top ``detections_per_img`` (query, class) scores, as the
  families' image processors post-process them.

Default taps: the multi-scale maps the decoder reads, i.e. the hybrid encoder's outputs
(strides 8/16/32) for RT-DETR-like models, the input projections for DETR-like ones; the root is
the whole model (the teacher stops as soon as its tapped levels are computed).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, clip_boxes_to_image

from ..methods.context import QueryLayer
from .protocol import HeadInfo, WrappedDetector

__all__ = ["TransformersDetector", "is_transformers_detector"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# model_type -> default taps (relative to the ForObjectDetection model) and normalisation.
_ENCODER_TAPPED = ("rt_detr", "rt_detr_v2", "d_fine", "deimv2")
_UNNORMALISED = ("rt_detr", "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr")


def is_transformers_detector(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``*ForObjectDetection`` model."""
    cls = type(model)
    return (cls.__module__.startswith("transformers.")
            and cls.__name__.endswith("ForObjectDetection") and hasattr(model, "config"))


def _default_taps(model: nn.Module) -> str | list[str]:
    kind = model.config.model_type
    if kind in _ENCODER_TAPPED:
        return "model.model.encoder"
    inner = getattr(model, "model", None)
    proj = getattr(inner, "input_proj", None)
    if isinstance(proj, nn.ModuleList):  # Deformable DETR: one projection per level
        return [f"model.model.input_proj.{i}" for i in range(len(proj))]
    if inner is not None and hasattr(inner, "input_projection"):  # DETR, Conditional DETR
        return "model.model.input_projection"
    raise ValueError(f"no default taps known for transformers model_type {kind!r}; pass "
                     "student_layers / teacher_layers (module paths under 'model.')")


class TransformersDetector(WrappedDetector):
    """A transformers object-detection model in torchvision's calling convention.

    Args:
        model: a ``*ForObjectDetection`` model (its ``config.num_labels`` = K object classes;
            structkd's labels 1..K map to its class ids 0..K-1).
        min_size, max_size: the resizing of torchvision's transform (shorter side to
            ``min_size`` unless the longer exceeds ``max_size``); default 640 and 640.
        image_mean, image_std: the normalisation; default the family's (see the module).
        size_divisible: the padded batch's sides are multiples of it (32: the coarsest stride).
        detections_per_img: detections kept per image at prediction.
        score_thresh: predictions with a lower score are dropped.
    """

    family = "detr"
    adapter = "transformers"
    root = "model"

    def __init__(self, model: nn.Module, *, min_size: int = 640, max_size: int = 640,
                 image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 size_divisible: int = 32, detections_per_img: int = 100,
                 score_thresh: float = 0.0) -> None:
        super().__init__()
        if not is_transformers_detector(model):
            raise ValueError(f"{type(model).__name__} is not a transformers *ForObjectDetection "
                             "model")
        self.model = model
        kind = model.config.model_type
        plain = kind in _UNNORMALISED
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size,
            image_mean if image_mean is not None else ([0.0] * 3 if plain else IMAGENET_MEAN),
            image_std if image_std is not None else ([1.0] * 3 if plain else IMAGENET_STD),
            size_divisible=size_divisible)
        self._options = {"min_size": min_size, "max_size": max_size,
                         "image_mean": list(self.transform.image_mean),
                         "image_std": list(self.transform.image_std),
                         "size_divisible": size_divisible,
                         "detections_per_img": detections_per_img, "score_thresh": score_thresh}
        self.taps = _default_taps(model)
        self.num_labels = int(model.config.num_labels)
        self.detections_per_img = int(detections_per_img)
        self.score_thresh = float(score_thresh)
        self._mask = "pixel_mask" in inspect.signature(model.forward).parameters
        if self._sigmoid_decoder():
            self.head_path = "model"  # its output holds every decoder layer's predictions

    @property
    def num_classes(self) -> int:
        return self.num_labels + 1

    def _sigmoid_decoder(self) -> bool:
        """Whether the model reports every decoder layer's sigmoid logits and boxes (RT-DETR,
        RT-DETRv2, D-FINE, DEIMv2: ``intermediate_logits``)."""
        return self.model.config.model_type in _ENCODER_TAPPED

    def head_info(self) -> HeadInfo:
        kind = self.model.config.model_type
        if not self._sigmoid_decoder():
            return HeadInfo(None, name=kind, why=f"structkd reads the decoder layers of "
                            f"{list(_ENCODER_TAPPED)} models (sigmoid classifiers), not {kind}'s")
        return HeadInfo("detr", name=kind, why=f"{kind} is a DETR-family detector: its "
                        "predictions are per query, not per location")

    def _kwargs(self, x: Tensor, sizes: Sequence[tuple[int, int]] | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._mask:
            mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.long, device=x.device)
            for i, (h, w) in enumerate(sizes or [tuple(x.shape[-2:])] * x.shape[0]):
                mask[i, :h, :w] = 1
            kwargs["pixel_mask"] = mask
        return kwargs

    def query_layers(self, raw: Any) -> list[QueryLayer]:
        logits, boxes = raw.intermediate_logits, raw.intermediate_reference_points
        meta = getattr(raw, "denoising_meta_values", None)
        if meta is not None:  # training: the denoising queries come first
            dn = int(meta["dn_num_split"][0])
            logits, boxes = logits[:, :, dn:], boxes[:, :, dn:]
        return [QueryLayer(logits[:, i], boxes[:, i]) for i in range(logits.shape[1])]

    def run_queries(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]] | None) -> Any:
        self._check_queries(*batch.shape[-2:])
        return self.model(pixel_values=batch, **self._kwargs(batch, image_sizes))

    def options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        batch, targets, original = self.batched(images, targets)
        x = batch.tensors
        height, width = x.shape[-2:]
        self._check_queries(height, width)
        kwargs: dict[str, Any] = {}
        if self._mask:
            mask = torch.zeros(x.shape[0], height, width, dtype=torch.long, device=x.device)
            for i, (h, w) in enumerate(batch.image_sizes):
                mask[i, :h, :w] = 1
            kwargs["pixel_mask"] = mask
        scale = x.new_tensor([width, height, width, height])
        if self.training:
            assert targets is not None
            out = self.model(pixel_values=x, labels=self._labels(targets, scale), **kwargs)
            return self._losses(out)
        out = self.model(pixel_values=x, **kwargs)
        detections = self._detections(out.logits, out.pred_boxes, scale, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original)

    def _check_queries(self, height: int, width: int) -> None:
        """RT-DETR-like models pick their queries among the encoder's positions: refuse a batch
        too small for them with what to change (transformers says "index k out of range")."""
        config = self.model.config
        queries, strides = getattr(config, "num_queries", None), getattr(config, "feat_strides",
                                                                         None)
        if not queries or not strides:
            return
        positions = sum(-(-height // s) * -(-width // s) for s in strides)
        if positions < queries:
            raise ValueError(f"a {height}x{width} batch gives {positions} encoder positions, fewer "
                             f"than the model's num_queries={queries}: use larger images "
                             "(min_size / max_size) or a model with fewer queries")

    def _labels(self, targets: list[dict[str, Tensor]], scale: Tensor) -> list[dict[str, Tensor]]:
        labels = []
        for t in targets:
            cls = self.class_ids(t, "num_labels")
            boxes = box_convert(t["boxes"].to(scale.dtype), "xyxy", "cxcywh") / scale
            labels.append({"class_labels": cls, "boxes": boxes})
        return labels

    @staticmethod
    def _losses(out: Any) -> dict[str, Tensor]:
        terms = dict(getattr(out, "loss_dict", None) or {})
        if terms:
            total = torch.stack([v.float() for v in terms.values()]).sum()
            if torch.allclose(total.detach(), out.loss.detach().float(), rtol=1e-4, atol=1e-5):
                return terms
        return {"loss": out.loss}

    def _detections(self, logits: Tensor, boxes: Tensor, scale: Tensor,
                    sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        logits, boxes = logits.float(), boxes.float()
        xyxy = box_convert(boxes, "cxcywh", "xyxy") * scale.float()
        out = []
        for i, (h, w) in enumerate(sizes):
            if logits.shape[-1] == self.num_labels + 1:  # softmax with a "no object" class
                scores, labels = logits[i].softmax(-1)[:, :-1].max(-1)
                keep = scores.argsort(descending=True)[:self.detections_per_img]
                b, scores, labels = xyxy[i, keep], scores[keep], labels[keep]
            else:  # sigmoid per class: the best (query, class) pairs
                probs = logits[i].sigmoid().flatten()
                k = min(self.detections_per_img, probs.numel())
                scores, idx = probs.topk(k)
                labels = idx % logits.shape[-1]
                b = xyxy[i, idx // logits.shape[-1]]
            b = clip_boxes_to_image(b, (h, w))
            keep = scores > self.score_thresh
            out.append({"boxes": b[keep], "scores": scores[keep], "labels": labels[keep] + 1})
        return out

    def save_native(self, path: str | Path) -> Path:
        """``save_pretrained`` of the wrapped model into the folder ``path``."""
        path = Path(path)
        self.model.save_pretrained(path)
        return path
