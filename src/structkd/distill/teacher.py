"""The frozen teacher: eval mode, no gradient, a fused inference copy of the part that runs.

Only the teacher's feature root (``backbone`` for torchvision detectors: trunk + FPN) runs, on
exactly the student's transformed batch. Where the two detectors normalise images differently the
batch is re-normalised, and the padded area set back to zero, as the teacher's own transform
would have left it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ..detectors import protocol_of
from ..methods import HeadLevel, QueryLayer
from .pairing import LevelInfo, measure_levels
from .taps import FeatureTap, as_levels, find_module, unwrap

logger = logging.getLogger("structkd.distill")
# The teacher's compute dtype by name (None: follow the trainer's autocast).
TeacherDtype = Literal["float32", "bfloat16", "float16"]
TEACHER_DTYPES = (None, *get_args(TeacherDtype))


def as_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A teacher compute dtype from its name (or a torch.dtype); None follows autocast."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value not in TEACHER_DTYPES:
        raise ValueError(f"teacher_dtype={value!r}; expected one of {list(TEACHER_DTYPES)}")
    return None if value is None else getattr(torch, value)


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter and buffer (names, shapes, dtypes and values)."""
    return tensors_fingerprint(unwrap(model).state_dict().items())


def tensors_fingerprint(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A short hash of named tensors (names, shapes, dtypes and values, in the order given):
    what a weights file holds, whatever the order of its header (safetensors writes its
    metadata in an unspecified order, so two saves of the same weights differ as files)."""
    h = hashlib.sha256()
    for k, v in tensors:
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fused_copy(module: nn.Module) -> nn.Module:
    """A frozen, faster copy of ``module`` for inference: BatchNorm (also torchvision's
    FrozenBatchNorm2d) folded into the preceding convolutions by ``torch.fx``, channels-last.
    About 20% faster on CPU; exact up to float rounding. Untraceable modules stay unfused."""
    from torch.fx.experimental.optimization import fuse
    from torchvision.ops.misc import FrozenBatchNorm2d

    neck = copy.deepcopy(module).eval()
    for parent in list(neck.modules()):
        for name, child in parent.named_children():
            if isinstance(child, FrozenBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps).eval()
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, key).data.copy_(getattr(child, key))
                setattr(parent, name, bn)
    try:
        neck = fuse(neck)
    except Exception as e:
        logger.info("teacher features not fused (%s: %s); running them as they are",
                    type(e).__name__, e)
    return neck.to(memory_format=torch.channels_last).requires_grad_(False)


class FrozenTeacher:
    """Computes a teacher's tapped features on the student's batched input.

    ``root`` is the teacher module that takes the batched image tensor (``"backbone"`` for
    torchvision detectors); ``layers`` the tapped module path(s) inside it (the root itself by
    default: its output levels). With the root's own output tapped, a BatchNorm-folded copy of
    the root runs; it is rebuilt when the teacher's weights change.
    """

    def __init__(self, teacher: nn.Module, *, root: str = "backbone",
                 layers: str | Sequence[str] = "backbone", dtype: str | torch.dtype | None = None,
                 student_norm: tuple[list[float], list[float]] | None = None,
                 device: str | torch.device | None = None) -> None:
        self.model = unwrap(teacher).eval().requires_grad_(False)
        self.device = None if device is None else torch.device(device)
        if self.device is not None:
            self.model.to(self.device)
        self.root = root
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.dtype = as_dtype(dtype)
        find_module(self.model, root, "teacher")
        bad = [p for p in self.layers if not (p == root or p.startswith(root + ".") or not root)]
        if bad:
            raise ValueError(f"teacher layers {bad} are not inside the teacher root '{root}' "
                             "(the part of the teacher that runs)")
        self.fused = self.layers == [root]
        self.tap = None if self.fused else FeatureTap(self.model, self.layers)
        self._copy: list[nn.Module] = []
        self._version = -1
        teacher_norm = protocol_of(self.model).normalisation()
        self.renormalise = (student_norm is not None and teacher_norm is not None
                            and student_norm != teacher_norm)
        self.scale = self.shift = None
        if self.renormalise:
            assert student_norm is not None and teacher_norm is not None
            (s_mean, s_std), (t_mean, t_std) = student_norm, teacher_norm
            self.scale = torch.tensor(s_std).div(torch.tensor(t_std)).view(3, 1, 1)
            self.shift = (torch.tensor(s_mean) - torch.tensor(t_mean)).div(
                torch.tensor(t_std)).view(3, 1, 1)

    def tap_for_dry_run(self) -> FeatureTap:
        """A tap on the teacher that reads the same levels as :meth:`features` returns."""
        return self.tap if self.tap is not None else FeatureTap(self.model, self.layers)

    def measure(self) -> OrderedDict[str, LevelInfo]:
        """Each level's stride and width, by a dry run of the root on a blank image."""
        tap = self.tap_for_dry_run()
        try:
            return measure_levels(self.model, tap, self.root, role="teacher")
        finally:
            if tap is not self.tap:
                tap.close()

    def fingerprint(self) -> str:
        """A hash of the teacher's weights (checked when a run resumes)."""
        return weights_fingerprint(self.model)

    def close(self) -> None:
        """Remove the teacher's tap (where its tapped layers are not its root's output)."""
        if self.tap is not None:
            self.tap.close()

    @property
    def runner(self) -> nn.Module:
        """The module that runs: the fused copy of the root, or the root itself (with taps)."""
        if not self.fused:
            return find_module(self.model, self.root)
        version = sum(t._version for t in (*self.model.parameters(), *self.model.buffers()))
        if not self._copy or version != self._version:
            self._copy = [fused_copy(find_module(self.model, self.root))]
            self._version = version
        return self._copy[0]

    def to(self, fn) -> None:
        """Apply a module ``_apply`` function (``.to()``, ``.cuda()``, ``.double()``); a
        teacher on its own ``device`` takes dtype changes and stays there."""
        self.model._apply(fn)
        if self.device is not None:
            self.model.to(self.device)
        if self.scale is not None:
            self.scale, self.shift = fn(self.scale), fn(self.shift)
        self._copy = []  # re-derived from the moved teacher on next use

    def __getstate__(self) -> dict:
        # The fused copy is derived from the teacher and rebuilt on first use: pickling it (DDP
        # spawn sends the Distiller to every process) would add a second copy of the teacher's
        # root to every pickle and deep copy.
        return {**self.__dict__, "_copy": [], "_version": -1}

    @torch.no_grad()
    def features(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]] | None = None,
                 targets: Any = None) -> OrderedDict[str, Tensor]:
        """The teacher's tapped maps on the student's batched input (B, 3, H, W); ``targets``
        are not needed (a cache's lookup key).

        With ``dtype`` set the teacher runs under autocast to it (float32: autocast off) and its
        maps come back in the input's dtype. A teacher on its own ``device`` gets the batch
        there and its maps come back to the batch's device.
        """
        if self.device is not None and self.device != batch.device:
            levels = self._features(batch.to(self.device, non_blocking=True), image_sizes)
            return OrderedDict((k, v.to(batch.device, non_blocking=True))
                               for k, v in levels.items())
        return self._features(batch, image_sizes)

    def _features(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]] | None
                  ) -> OrderedDict[str, Tensor]:
        x = self._normalised(batch, image_sizes)
        if self.fused:
            x = x.contiguous(memory_format=torch.channels_last)
        runner = self.runner
        if self.dtype is None:
            out = self._run(runner, x)
        else:
            with torch.autocast(x.device.type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32):
                out = self._run(runner, x)
        return OrderedDict((k, v.to(batch.dtype) if v.dtype != batch.dtype and
                            self.dtype is not None else v) for k, v in out.items())

    @torch.no_grad()
    def head(self, levels: OrderedDict[str, Tensor], batch_shape: tuple[int, int]
             ) -> list[HeadLevel]:
        """The teacher's head on its own levels (those :meth:`features` returned, which must
        be its head's inputs: the family's default taps), decoded per level; float32, on the
        levels' device. Same dtype rule as :meth:`features`."""
        view = protocol_of(self.model)
        maps = list(levels.values())
        if self.device is not None:
            maps = [m.to(self.device, non_blocking=True) for m in maps]
        if self.dtype is None:
            raw = view.run_head(maps)
        else:
            with torch.autocast(maps[0].device.type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32):
                raw = view.run_head(maps)
        out = view.head_levels(raw, maps, batch_shape)
        target = next(iter(levels.values())).device
        return [_float_on(h, target) for h in out]

    @torch.no_grad()
    def queries(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]] | None
                ) -> list[QueryLayer]:
        """A DETR-family teacher run whole on the student's batch: its predictions per decoder
        layer (float32, on the batch's device)."""
        view = protocol_of(self.model)
        x = batch if self.device is None else batch.to(self.device, non_blocking=True)
        x = self._normalised(x, image_sizes)
        with contextlib.ExitStack() as stack:
            if self.dtype is not None:
                stack.enter_context(torch.autocast(x.device.type, dtype=self.dtype,
                                                   enabled=self.dtype != torch.float32))
            layers = view.query_layers(view.run_queries(x, image_sizes))
        return [QueryLayer(q.logits.to(batch.device, torch.float32),
                           q.boxes.to(batch.device, torch.float32)) for q in layers]

    def _normalised(self, x: Tensor, image_sizes: Sequence[tuple[int, int]] | None) -> Tensor:
        """The student's batch in the teacher's normalisation, padding zero as the teacher's
        own transform leaves it."""
        if not self.renormalise:
            return x
        assert self.scale is not None and self.shift is not None
        x = x * self.scale.to(x) + self.shift.to(x)
        if image_sizes is not None:
            for i, (h, w) in enumerate(image_sizes):
                x[i, :, h:, :] = 0
                x[i, :, :h, w:] = 0
        return x

    def _run(self, runner: nn.Module, x: Tensor) -> OrderedDict[str, Tensor]:
        if self.fused:
            return as_levels(runner(x))
        assert self.tap is not None
        self.tap.clear()
        self.tap.run_until_complete(runner, x)  # the rest of the teacher is not needed
        return self.tap.levels()


def _float_on(level: HeadLevel, device: torch.device) -> HeadLevel:
    """A head level's tensors as float32 on ``device`` (a bf16 or remote teacher's)."""
    def f(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device=device, dtype=torch.float32)
    return dataclasses.replace(level, logits=f(level.logits), ltrb=f(level.ltrb),
                               distribution=f(level.distribution), quality=f(level.quality),
                               aux_logits=f(level.aux_logits))
