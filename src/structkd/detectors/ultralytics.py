"""Ultralytics detectors (YOLOv8, YOLO11, YOLO26, Ultralytics' RT-DETR) as structkd detectors.

The wrapper speaks torchvision's calling convention (see :mod:`structkd.detectors.protocol`):

* images are resized and padded by torchvision's ``GeneralizedRCNNTransform`` with no
  normalisation (Ultralytics models take pixels in [0, 1]); the padded batch's sides are
  multiples of the model's coarsest stride, so the batched tensor the teacher and the taps see is
  the one the model sees;
* targets become Ultralytics' batch dict (``img``, ``batch_idx``, ``cls`` = label - 1,
  ``bboxes`` = (cx, cy, w, h) normalised by the padded batch's width and height) and the losses
  are the model's own ``loss(batch)`` (``v8DetectionLoss``, YOLO26's ``E2ELoss``, RT-DETR's
  ``RTDETRDetectionLoss``) with the model's hyperparameters (``model.args``: box/cls/dfl gains;
  Ultralytics' defaults where the model has none);
* predictions are Ultralytics' own NMS (``non_max_suppression``; NMS-free heads and RT-DETR:
  its top-k) mapped back to the original images' pixels, labels = class + 1.

Default taps: the modules feeding the head (``model.model.{i}`` for ``i`` in the head's ``f``,
e.g. [15, 18, 21] for YOLOv8: strides 8/16/32); the root is the ``DetectionModel`` itself (the
teacher stops as soon as its tapped levels are computed).

Nothing here imports ultralytics at import time (it is an optional, AGPL-3.0 dependency).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision import ops
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, clip_boxes_to_image

from ..methods.context import HeadLevel
from .protocol import HeadInfo, WrappedDetector, remove_hooks

__all__ = ["INSTALL", "UltralyticsDetector", "import_ultralytics", "is_ultralytics_detector"]

INSTALL = "pip install 'structkd[ultralytics]' (AGPL-3.0)"
# The ultralytics.nn.tasks classes wrapped (segmentation, pose, OBB, world models are not).
_DETECT = "DetectionModel"
_RTDETR = "RTDETRDetectionModel"
# Ultralytics' non_max_suppression: boxes considered at most, class offset of class-aware NMS.
_MAX_NMS = 30000
_MAX_WH = 7680.0


def import_ultralytics() -> Any:
    """The ``ultralytics`` package, or an ImportError saying how to install it."""
    try:
        import ultralytics
    except ImportError as e:
        raise ImportError(f"Ultralytics models need the ultralytics package: {INSTALL}") from e
    return ultralytics


def _task_class(model: object) -> str | None:
    """The first ``ultralytics.nn.tasks`` class in ``model``'s MRO (no ultralytics import)."""
    for cls in type(model).__mro__:
        if cls.__module__ == "ultralytics.nn.tasks":
            return cls.__name__
    return None


def _is_yolo_object(model: object) -> bool:
    """Whether ``model`` is an ``ultralytics.YOLO`` / ``RTDETR`` (engine ``Model``) object."""
    return any(c.__module__ == "ultralytics.engine.model" and c.__name__ == "Model"
               for c in type(model).__mro__)


def _inner(model: nn.Module) -> nn.Module:
    """A ``YOLO`` object's ``DetectionModel``; anything else as it is."""
    if _is_yolo_object(model) and isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    return model


def is_ultralytics_detector(model: nn.Module) -> bool:
    """Whether ``model`` is an Ultralytics ``DetectionModel`` / ``RTDETRDetectionModel`` (or a
    ``YOLO`` object holding one); segmentation, pose, OBB and open-vocabulary models are not."""
    return _task_class(_inner(model)) in (_DETECT, _RTDETR)


def ensure_args(model: nn.Module) -> None:
    """Give ``model.args`` the attributes its loss reads (box/cls/dfl gains, epochs).

    A model built from a YAML has no ``args``, and one loaded from a ``.pt`` has a plain dict;
    Ultralytics' trainer attaches its ``get_cfg`` namespace. Here: Ultralytics' defaults updated
    with whatever the model already carries.
    """
    args = getattr(model, "args", None)
    if all(hasattr(args, k) for k in ("box", "cls", "dfl", "epochs")):
        return
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    own = args if isinstance(args, dict) else dict(vars(args)) if args is not None else {}
    model.args = IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **own})
    model.criterion = None  # a criterion built earlier read the old args


def _describe(model: nn.Module) -> str:
    """The model's name in messages: its YAML's file name where known (``yolo26n.yaml``)."""
    yaml = getattr(model, "yaml", None)
    name = yaml.get("yaml_file") if isinstance(yaml, dict) else None
    return Path(str(name)).stem if name else type(model).__name__


def _criterion_device(criterion: Any) -> torch.device | None:
    inner = getattr(criterion, "one2many", criterion)  # YOLO26 / YOLOv10: E2ELoss
    device = getattr(inner, "device", None)
    return torch.device(device) if device is not None else None


class UltralyticsDetector(WrappedDetector):
    """An Ultralytics detection model in torchvision's calling convention.

    Args:
        model: an ``ultralytics.nn.tasks.DetectionModel`` (YOLOv8/11/26, ...) or
            ``RTDETRDetectionModel``, or a ``YOLO`` / ``RTDETR`` object (its ``.model`` is
            wrapped). Its ``nc`` = K object classes; structkd's labels 1..K are its 0..K-1.
        min_size, max_size: the resizing of torchvision's transform (shorter side to
            ``min_size`` unless the longer exceeds ``max_size``); default 640 and 640, i.e.
            Ultralytics' ``imgsz=640`` (longer side 640) for square and landscape images alike.
        size_divisible: the padded batch's sides are multiples of it; None: the model's
            coarsest stride (32, or 64 for P6 models).
        conf_thresh, iou_thresh: NMS's confidence and IoU thresholds at prediction (0.001 and
            0.7: Ultralytics' validation settings).
        detections_per_img: detections kept per image (Ultralytics' ``max_det``).
        agnostic_nms: class-agnostic NMS.
        loss_reduction: "mean" (default): YOLO's terms per image, as torchvision's detectors
            report theirs, so that a method's weight means the same against the detection loss
            whatever the student's family (and the trainer integration, which adds the method's
            term times the batch size to Ultralytics' summed loss, keeps the same ratio);
            "sum": what Ultralytics' trainer back-propagates, its per-image losses times the
            batch size (RT-DETR's losses are not batch-scaled either way).

    Losses: a dict of named terms (YOLO: ``box``, ``cls``, ``dfl`` (``l1`` for DFL-free heads
    such as YOLO26), each already multiplied by its gain in ``model.args``; RT-DETR: its
    criterion's terms, ``class``, ``bbox``, ``giou`` and their ``_aux`` / ``_dn`` variants).
    With ``loss_reduction="sum"`` their sum is exactly ``loss.sum()`` of Ultralytics' trainer
    for the same batch, which also accumulates gradients over ``nbs`` = 64 images before a step
    (a batch of B images is stepped every ``round(64 / B)`` batches) and scales weight decay to
    match; choose the learning rate with that in mind. YOLO26's one-to-many / one-to-one mix
    (0.8 / 0.2 at the start) decays only when ``model.criterion.update()`` is called, which
    Ultralytics' trainer does once per epoch.
    """

    family = "yolo"
    adapter = "ultralytics"
    root = "model"

    def __init__(self, model: nn.Module, *, min_size: int = 640, max_size: int = 640,
                 size_divisible: int | None = None, conf_thresh: float = 0.001,
                 iou_thresh: float = 0.7, detections_per_img: int = 100,
                 agnostic_nms: bool = False,
                 loss_reduction: Literal["sum", "mean"] = "mean") -> None:
        super().__init__()
        model = _inner(model)
        if not is_ultralytics_detector(model):
            raise ValueError(f"{type(model).__name__} is not an Ultralytics DetectionModel or "
                             "RTDETRDetectionModel (segmentation, pose, OBB and world models "
                             "are not supported)")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction={loss_reduction!r}; expected 'sum' or 'mean'")
        self.model = model
        self.is_rtdetr = _task_class(model) == _RTDETR
        if self.is_rtdetr:
            self.family = "rtdetr"
        ensure_args(model)
        head = model.model[-1]
        if not hasattr(model, "nc"):  # Ultralytics' trainer sets it; RT-DETR's loss reads it
            model.nc = int(head.nc)
        stride = int(torch.as_tensor(getattr(model, "stride", 32)).max().item())
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, [0.0] * 3, [1.0] * 3,
            size_divisible=max(32, stride) if size_divisible is None else size_divisible)
        sources = [head.f] if isinstance(head.f, int) else list(head.f)
        here = int(getattr(head, "i", len(model.model) - 1))  # -1: the layer before the head
        self.taps = [f"model.model.{i if i >= 0 else here + i}" for i in sources]
        if not self.is_rtdetr:
            self.head_path = f"model.model.{here}"
        self.num_labels = int(head.nc)
        self.conf_thresh = float(conf_thresh)
        self.iou_thresh = float(iou_thresh)
        self.detections_per_img = int(detections_per_img)
        self.agnostic_nms = bool(agnostic_nms)
        self.loss_reduction = loss_reduction
        self._options = {"min_size": min_size, "max_size": max_size,
                         "size_divisible": self.transform.size_divisible,
                         "conf_thresh": conf_thresh, "iou_thresh": iou_thresh,
                         "detections_per_img": detections_per_img,
                         "agnostic_nms": agnostic_nms, "loss_reduction": loss_reduction}

    @property
    def num_classes(self) -> int:
        return self.num_labels + 1

    def head_info(self) -> HeadInfo:
        head = self.model.model[-1]
        name = _describe(self.model)
        if self.is_rtdetr:
            return HeadInfo(None, name=name, why=f"{name} is a DETR-family detector; its "
                            "decoder's predictions per query are not dense head outputs")
        bins = int(getattr(head, "reg_max", 1))
        return HeadInfo("dense", bins=bins if bins > 1 else 0, anchors=1, name=name,
                        why=f"{name}'s head has no box distributions (reg_max {bins})")

    def head_levels(self, raw: Any, levels: Sequence[Tensor],
                    batch_shape: tuple[int, int]) -> list[HeadLevel]:
        """Ultralytics' raw predictions (training: a dict; eval: (decoded, dict); end-to-end
        heads: ``one2many`` and ``one2one`` dicts) per level: edge distances from the DFL
        expectation (bins of one stride) or the plain distances (reg_max 1), times the stride;
        the one-to-one branch's class logits as ``aux_logits``."""
        head = self.model.model[-1]
        preds = raw[1] if isinstance(raw, tuple) else raw
        aux = None
        if "one2many" in preds:
            preds, aux = preds["one2many"], preds["one2one"]
        bins = int(getattr(head, "reg_max", 1))
        sizes = [tuple(x.shape[-2:]) for x in levels]
        counts = [h * w for h, w in sizes]
        boxes = preds["boxes"].split(counts, dim=-1)
        scores = preds["scores"].split(counts, dim=-1)
        aux_scores = aux["scores"].split(counts, dim=-1) if aux is not None else None
        strides = [int(s) for s in head.stride.tolist()]
        out = []
        for i, (h, w) in enumerate(sizes):
            b = boxes[i].shape[0]
            logits = scores[i].reshape(b, 1, -1, h, w)
            stride = strides[i]
            dist = None
            if bins > 1:
                dist = boxes[i].reshape(b, 1, 4, bins, h, w)
                r = torch.arange(bins, device=dist.device, dtype=torch.float32)
                ltrb = (dist.float().softmax(dim=3) * r.view(1, 1, 1, -1, 1, 1)).sum(3) * stride
            else:
                ltrb = boxes[i].reshape(b, 1, 4, h, w).float() * stride
            out.append(HeadLevel(stride, logits, ltrb, offset=0.5, distribution=dist,
                                 aux_logits=None if aux_scores is None
                                 else aux_scores[i].reshape(b, 1, -1, h, w)))
        return out

    def options(self) -> dict[str, Any]:
        return dict(self._options)

    def rebuild_name(self, native: Path) -> str:
        """The model's YAML written beside the ``.pt``: a structkd export is rebuilt from it
        and its safetensors, never by unpickling the checkpoint."""
        return native.with_suffix(".yaml").name

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        batch, targets, original = self.batched(images, targets)
        x = batch.tensors
        if self.training:
            assert targets is not None
            return self._losses(self.ultralytics_batch(x, targets))
        detections = self._detections(self.model(x), x, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original)

    def ultralytics_batch(self, x: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Ultralytics' training batch dict for the batched tensor ``x`` and the transformed
        ``targets`` (boxes in ``x``'s pixels): ``cls`` (n, 1) = label - 1, ``bboxes`` (n, 4)
        normalised (cx, cy, w, h), ``batch_idx`` (n,) the image of each box."""
        height, width = x.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32,
                             device=x.device)
        cls, boxes, index = [], [], []
        for i, t in enumerate(targets):
            labels = self.class_ids(t, "nc").to(x.device)
            xyxy = t["boxes"].to(device=x.device, dtype=torch.float32).reshape(-1, 4)
            cls.append(labels.float())
            boxes.append(box_convert(xyxy, "xyxy", "cxcywh") / scale)
            index.append(torch.full_like(labels, i, dtype=torch.float32))
        return {"img": x, "batch_idx": torch.cat(index), "cls": torch.cat(cls)[:, None],
                "bboxes": torch.cat(boxes)}

    def _losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        criterion = getattr(self.model, "criterion", None)
        if criterion is not None and _criterion_device(criterion) not in (
                None, batch["img"].device):
            self.model.criterion = None  # built on another device: rebuilt by .loss
        if self.is_rtdetr:
            return self._rtdetr_losses(batch)
        loss, items = self.model.loss(batch)
        names = [str(k).removesuffix("_loss") for k in items]
        if loss.ndim == 1 and loss.numel() == len(names):
            terms = dict(zip(names, loss.unbind(0), strict=True))
        else:
            terms = {"loss": loss.sum()}
        if self.loss_reduction == "mean":
            terms = {k: v / batch["img"].shape[0] for k, v in terms.items()}
        return terms

    def _rtdetr_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """RT-DETR's criterion terms (its ``loss`` returns only their sum), read by a forward
        hook on the criterion (an ``nn.Module``)."""
        model = self.model
        if getattr(model, "criterion", None) is None:
            model.criterion = model.init_criterion()
        seen: dict[str, Tensor] = {}
        handle = None
        if isinstance(model.criterion, nn.Module):
            handle = model.criterion.register_forward_hook(lambda m, i, out: seen.update(out))
        try:
            total, _ = model.loss(batch)
        finally:
            if handle is not None:
                handle.remove()
        terms = {str(k).removeprefix("loss_"): v for k, v in seen.items()}
        if not terms or not torch.allclose(sum(terms.values()).detach(), total.detach(),
                                           rtol=1e-4, atol=1e-5):
            return {"loss": total}
        return terms

    def _detections(self, out: Any, x: Tensor,
                    sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        pred = out[0] if isinstance(out, tuple | list) else out
        dets = self._rtdetr_topk(pred.float(), x) if self.is_rtdetr else self.nms(pred.float())
        result = []
        for d, (h, w) in zip(dets, sizes, strict=True):
            b = clip_boxes_to_image(d[:, :4], (h, w))
            result.append({"boxes": b, "scores": d[:, 4], "labels": d[:, 5].long() + 1})
        return result

    def nms(self, pred: Tensor) -> list[Tensor]:
        """Ultralytics' ``non_max_suppression`` with this wrapper's settings: (n, 6) per image,
        (x1, y1, x2, y2, score, class) in the batched tensor's pixels. While traced for ONNX
        export, the same selection written without data-dependent Python branches."""
        if torch.jit.is_tracing():
            return self._traceable_nms(pred)
        try:
            from ultralytics.utils.nms import non_max_suppression
        except ImportError:  # ultralytics < 8.3.160
            from ultralytics.utils.ops import non_max_suppression
        return non_max_suppression(
            pred, self.conf_thresh, self.iou_thresh, agnostic=self.agnostic_nms,
            max_det=self.detections_per_img, end2end=bool(getattr(self.model, "end2end", False)))

    def _traceable_nms(self, pred: Tensor) -> list[Tensor]:
        """Ultralytics' NMS selection as a graph: boxes whose best class scores above
        ``conf_thresh``, at most ``max_nms`` of them by score, class-aware NMS (boxes offset by
        class x 7680 px, as Ultralytics does), the best ``detections_per_img``. End-to-end heads
        (YOLO26: (B, k, 6) already selected) are only filtered by score."""
        out = []
        if pred.shape[-1] == 6 or bool(getattr(self.model, "end2end", False)):
            for p in pred:
                out.append(p[p[:, 4] > self.conf_thresh][: self.detections_per_img])
            return out
        nc = pred.shape[1] - 4
        for p in pred.transpose(-1, -2):
            boxes = box_convert(p[:, :4], "cxcywh", "xyxy")
            scores, classes = p[:, 4:4 + nc].max(1)
            if p.shape[0] > _MAX_NMS:  # static at a fixed input size
                scores, top = scores.topk(_MAX_NMS)
                boxes, classes = boxes[top], classes[top]
            keep = scores > self.conf_thresh
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep].float()
            offset = classes[:, None] * (0.0 if self.agnostic_nms else _MAX_WH)
            i = ops.nms(boxes + offset, scores, self.iou_thresh)[: self.detections_per_img]
            out.append(torch.cat([boxes[i], scores[i, None], classes[i, None]], dim=1))
        return out

    def _rtdetr_topk(self, pred: Tensor, x: Tensor) -> list[Tensor]:
        """RT-DETR's decoder output (B, k, 6) [cx, cy, w, h (normalised), score, class], already
        sorted by score, filtered as Ultralytics' ``RTDETRPredictor`` does (no NMS)."""
        height, width = x.shape[-2:]
        scale = pred.new_tensor([width, height, width, height])
        out = []
        for p in pred:
            keep = p[:, 4] > self.conf_thresh
            p = p[keep][: self.detections_per_img]
            boxes = box_convert(p[:, :4], "cxcywh", "xyxy") * scale
            out.append(torch.cat([boxes, p[:, 4:6]], dim=1))
        return out

    def save_native(self, path: str | Path, *, half: bool = False) -> Path:
        """Save the wrapped model alone as an Ultralytics checkpoint (``{"model": ...,
        "train_args": ..., ...}``, loadable by ``ultralytics.YOLO(path)``); ``.pt`` is appended
        to ``path`` unless it ends so. ``half``: fp16 weights, as Ultralytics' final
        checkpoints (default fp32, which loads back exactly). Returns the path written."""
        ultralytics = import_ultralytics()
        path = Path(path)
        if path.suffix != ".pt":
            path = path.with_name(path.name + ".pt")
        model = copy.deepcopy(self.model).cpu().float()
        remove_hooks(model, structkd_only=False)  # a Distiller's taps are no part of it
        model.criterion = None
        args = getattr(model, "args", None)
        args = dict(vars(args)) if args is not None and not isinstance(args, dict) else args
        model.args = args or {}
        if half:
            model.half()
        path.parent.mkdir(parents=True, exist_ok=True)
        from datetime import datetime

        import yaml

        spec = getattr(self.model, "yaml", None)
        if isinstance(spec, dict):  # the architecture, to rebuild without unpickling
            path.with_suffix(".yaml").write_text(yaml.safe_dump(
                {k: v for k, v in spec.items() if k != "yaml_file"}, sort_keys=False))
        torch.save({"model": model, "ema": None, "train_args": dict(model.args),
                    "date": datetime.now().astimezone().isoformat(),
                    "version": ultralytics.__version__,
                    "license": "AGPL-3.0 License (https://ultralytics.com/license)",
                    "docs": "https://docs.ultralytics.com"}, path)
        return path
