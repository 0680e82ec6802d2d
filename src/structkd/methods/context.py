"""What a distillation method receives each step: paired levels, the padded batch's geometry,
the ground truth (:class:`DistillContext`), and the per-image grouping that keeps padding out.

Padding: a batch of images of different shapes is padded to one size. The context says which
cells of every level hold image content; :meth:`DistillContext.groups` splits the batch into
images whose valid regions have equal sizes, so a method computes on each image's own region and
the padded area enters neither its loss nor its statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DistillContext", "Group", "HeadLevel", "Level", "QueryLayer"]


@dataclass(frozen=True)
class Level:
    """A student level paired with a teacher level of the same stride."""

    name: str  # e.g. "s8": the key of the features in the context, of adapters and of logs
    stride: int  # pixels of the batched input per feature cell
    student_channels: int
    teacher_channels: int


def _compute(x: Tensor) -> Tensor:
    """``x`` in a compute dtype: float32, float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass(frozen=True)
class HeadLevel:
    """A dense head's predictions at one level, in one layout whatever the family.

    ``logits``: (B, A, K, H, W) class logits of a sigmoid classifier (A anchors per location,
    K object classes; a class's score is ``sigmoid(logit)``). ``ltrb``: (B, A, 4, H, W) the
    distances, in pixels of the batched input, from the location's centre to the predicted
    box's left, top, right and bottom edges; the centre of cell (i, j) is
    ``((j + offset) * stride, (i + offset) * stride)``. ``distribution``: (B, A, 4, R, H, W)
    logits over R bins per edge where the head predicts one (DFL / GFL: bin r is a distance of
    ``r * stride`` pixels), else None. ``quality``: (B, A, 1, H, W) a quality logit that scales
    the score (FCOS's centre-ness: score ``sqrt(sigmoid(cls) * sigmoid(quality))``), else None.
    ``aux_logits``: a second classifier's logits of the same layout (YOLO26's one-to-one
    branch), else None.
    """

    stride: int
    logits: Tensor
    ltrb: Tensor
    offset: float = 0.0
    distribution: Tensor | None = None
    quality: Tensor | None = None
    aux_logits: Tensor | None = None

    @property
    def anchors(self) -> int:
        return int(self.logits.shape[1])

    def scores(self) -> Tensor:
        """(B, A, K, H, W) the detector's class scores (with the quality factor where any)."""
        p = _compute(self.logits).sigmoid()
        if self.quality is not None:
            p = (p * _compute(self.quality).sigmoid()).sqrt()
        return p

    def centres(self) -> Tensor:
        """(2, H, W) the x and y of every location's centre, in batch pixels."""
        h, w = self.logits.shape[-2:]
        dev = self.logits.device
        dtype = _compute(self.ltrb).dtype
        ys = (torch.arange(h, device=dev, dtype=dtype) + self.offset) * self.stride
        xs = (torch.arange(w, device=dev, dtype=dtype) + self.offset) * self.stride
        return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])

    def boxes(self) -> Tensor:
        """(B, A, 4, H, W) the predicted boxes (x1, y1, x2, y2) in batch pixels."""
        c = self.centres()
        d = _compute(self.ltrb)
        return torch.cat([c - d[:, :, :2], c + d[:, :, 2:]], dim=2)

    def select(self, index: Tensor) -> HeadLevel:
        """One anchor per location: ``index`` (B, 1, 1, H, W) picks it along A."""
        def take(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            shape = list(x.shape)
            shape[1] = 1
            idx = index.view(index.shape[0], 1, *([1] * (x.dim() - 4)), *x.shape[-2:])
            return x.gather(1, idx.expand(shape))
        return HeadLevel(self.stride, take(self.logits), take(self.ltrb),  # type: ignore[arg-type]
                         self.offset, take(self.distribution), take(self.quality),
                         take(self.aux_logits))

    def best_anchor(self, by: Tensor | None = None) -> HeadLevel:
        """One anchor per location: the one with the highest class score (of ``by``'s scores
        when given, another side's choice), as the detector would keep it."""
        if self.anchors == 1:
            return self
        source = self.scores() if by is None else by
        index = source.amax(dim=2, keepdim=True).argmax(dim=1, keepdim=True)
        return self.select(index)


@dataclass(frozen=True)
class QueryLayer:
    """One decoder layer's predictions of a DETR-family detector (denoising queries left out):
    ``logits`` (B, Q, K) of a sigmoid classifier over the K object classes, ``boxes`` (B, Q, 4)
    as (cx, cy, w, h) normalised by the batched input's width and height."""

    logits: Tensor
    boxes: Tensor


@dataclass(frozen=True)
class Group:
    """Images of a batch whose valid regions at one level have the same size."""

    index: list[int]  # positions in the batch, ascending
    height: int  # valid rows of the level for these images
    width: int  # valid columns
    full: bool  # the group is the whole batch and fills the whole map: no copy needed

    def crop(self, x: Tensor) -> Tensor:
        """The group's images and valid region of a (B, ...) map: (len(index), C, h, w)."""
        if self.full:
            return x
        if len(self.index) != x.shape[0]:
            x = x[self.index] if len(self.index) > 1 else x[self.index[0]][None]
        return x[..., : self.height, : self.width]


@dataclass
class DistillContext:
    """Everything a method may use in one training step.

    ``student`` and ``teacher`` map level names to (B, C, H, W) features: the student's as they
    come out of its neck (with gradient), the teacher's detached, both on the same grid.
    ``image_sizes`` are the (height, width) of each image inside the padded batch of shape
    ``batch_shape``; None means every image fills the batch. ``boxes`` (x1, y1, x2, y2) and
    ``labels`` are the ground truth in the same (resized, padded) pixel coordinates; None when the
    caller has none (methods that need them say so). ``student_head`` and ``teacher_head`` map
    level names to the dense heads' predictions (:class:`HeadLevel`, one anchor layout on both
    sides) when the method needs them; the student's with gradient, the teacher's detached.
    ``cross_head``: the teacher's head layers run on the student's head features (CrossKD),
    with gradient to the student. ``student_queries`` / ``teacher_queries``: a DETR-family
    detector's predictions per decoder layer (:class:`QueryLayer`), for methods that read them.
    """

    student: Mapping[str, Tensor]
    teacher: Mapping[str, Tensor]
    levels: Mapping[str, Level]
    batch_shape: tuple[int, int]
    image_sizes: Sequence[tuple[int, int]] | None = None
    boxes: Sequence[Tensor] | None = None
    labels: Sequence[Tensor] | None = None
    student_head: Mapping[str, HeadLevel] | None = None
    teacher_head: Mapping[str, HeadLevel] | None = None
    cross_head: Mapping[str, HeadLevel] | None = None
    student_queries: Sequence[QueryLayer] | None = None
    teacher_queries: Sequence[QueryLayer] | None = None

    @property
    def batch_size(self) -> int:
        return next(iter(self.teacher.values())).shape[0]

    def valid_cells(self, name: str) -> list[tuple[int, int]]:
        """(rows, columns) of level ``name`` that hold image content, per image.

        A cell is valid when any image pixel falls into it: ``ceil(size / stride)``, clipped to
        the map (convolutions with stride 2 round up in the same way).
        """
        h, w = self.teacher[name].shape[-2:]
        if self.image_sizes is None:
            return [(h, w)] * self.batch_size
        s = self.levels[name].stride
        return [(min(h, math.ceil(ih / s)), min(w, math.ceil(iw / s)))
                for ih, iw in self.image_sizes]

    def groups(self, name: str) -> list[Group]:
        """The batch split into groups of equal valid size at level ``name`` (first seen first)."""
        h, w = self.teacher[name].shape[-2:]
        cells = self.valid_cells(name)
        if all(c == (h, w) for c in cells):
            return [Group(list(range(len(cells))), h, w, True)]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(cells):
            by_size.setdefault(c, []).append(i)
        return [Group(idx, ch, cw, False) for (ch, cw), idx in by_size.items()]

    def valid_mask(self, name: str) -> Tensor:
        """(B, 1, H, W) float32 mask of the valid cells of level ``name`` (1 inside, 0 padding).

        Always float32 (float64 for float64 features), whatever the features' dtype: counts of
        valid cells taken from it must not round (bfloat16 holds integers exactly only to 256).
        """
        t = self.teacher[name]
        b, _, h, w = t.shape
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        mask = torch.zeros(b, 1, h, w, dtype=dtype, device=t.device)
        for i, (vh, vw) in enumerate(self.valid_cells(name)):
            mask[i, :, :vh, :vw] = 1
        return mask

    def level_boxes(self, name: str, index: Sequence[int]) -> list[Tensor]:
        """Ground-truth boxes of images ``index`` in cells of level ``name`` (x1, y1, x2, y2)."""
        if self.boxes is None:
            raise ValueError("this method needs ground-truth boxes, but the context has none")
        s = self.levels[name].stride
        return [self.boxes[i].to(torch.float32) / s for i in index]

    def mean_over_images(
        self, name: str, fn: Callable[[Tensor, Tensor, Group], Tensor],
        student: Tensor | None = None,
    ) -> Tensor:
        """Mean over the batch's images of ``fn`` computed on each image's valid region.

        ``fn(s, t, group)`` receives equal-size crops (b, C, h, w) and returns the *mean* of its
        per-image values; groups are weighted by their number of images. ``student`` replaces the
        context's student map (e.g. after an adapter).
        """
        s_map = self.student[name] if student is None else student
        t_map = self.teacher[name]
        total: Tensor | None = None
        b = t_map.shape[0]
        for g in self.groups(name):
            value = fn(g.crop(s_map), g.crop(t_map), g)
            part = value if g.full else value * (len(g.index) / b)
            total = part if total is None else total + part
        assert total is not None
        return total
