"""Running an exported detector in ONNX Runtime (CPU), and timing it.

:class:`OnnxDetector` wraps an ONNX Runtime session in torchvision's calling convention;
:func:`onnx_runner` is a zero-argument call on one fixed image (for ``structkd.timing``), and
:func:`onnx_latency` its median latency. Sessions run with a fixed intra-op thread count (by
default ``torch.get_num_threads()``), one inter-op thread, sequential execution and no spinning
of idle threads, so that their times compare with PyTorch's on the same thread budget.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...labels import label_map
from ...timing import time_call
from .export import INPUT_NAME, OUTPUT_NAMES, _as_hw, export_onnx, read_onnx_metadata

__all__ = ["OnnxDetector", "onnx_latency", "onnx_runner"]


def _session(path: str | os.PathLike, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads if threads is not None
                                       else torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # No busy-waiting of idle worker threads after a run: it would steal the CPU from whatever
    # runs next (PyTorch models timed in turn with this one, a training step).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


class OnnxDetector:
    """Runs an exported detector in ONNX Runtime with torchvision's calling convention.

    ``detector(images)`` takes a ``(3, H, W)`` tensor, a list of them, or a batch ``(N, 3, H, W)``
    (torch or numpy, float in ``[0, 1]``) and returns one ``{"boxes", "scores", "labels"}`` dict
    of torch tensors per image. ``threads`` defaults to ``torch.get_num_threads()``.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        self.session = _session(self.path, threads)
        self.input_shape = tuple(self.metadata["input"]["shape"])
        self.dynamic = bool(self.metadata["input"].get("dynamic"))
        self.class_names: list[str] = list(self.metadata.get("class_names") or [])
        self.label_to_cat_id = {int(k): int(v) for k, v in
                                (self.metadata.get("label_to_cat_id") or {}).items()}

    def label_map(self) -> dict[int, tuple[int, str]]:
        """contiguous label -> (category id, name), background excluded."""
        return label_map(self.class_names, self.label_to_cat_id)

    def _prepare(self, image: Any) -> np.ndarray:
        array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != 3 or array.shape[0] != 3:
            raise ValueError(f"image of shape {tuple(array.shape)} is invalid; expected "
                             "(3, H, W) float in [0, 1]")
        if not self.dynamic and tuple(array.shape) != self.input_shape:
            raise ValueError(f"image of shape {tuple(array.shape)} does not fit {self.path.name}, "
                             f"exported for a fixed {self.input_shape}; resize the image or "
                             "export with dynamic=True")
        return array

    def _one(self, image: Any) -> dict[str, Tensor]:
        array = self._prepare(image)
        boxes, scores, labels = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        return {"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                "labels": torch.from_numpy(labels).long()}

    def __call__(self, images: Any) -> list[dict[str, Tensor]]:
        if isinstance(images, (Tensor, np.ndarray)) and images.ndim == 3:
            images = [images]
        return [self._one(image) for image in images]


def onnx_runner(path: str | os.PathLike, image_size: int | Sequence[int] | None = None, *,
                seed: int = 0, threads: int | None = None) -> Callable[[], object]:
    """A zero-argument call of an exported detector in ONNX Runtime on one fixed random image
    (the ONNX twin of :func:`structkd.models.latency.torch_runner`: same image for the same
    seed).

    ``image_size`` defaults to the export's input size; a fixed-size export refuses another
    size with ``ValueError``. ``threads``: intra-op threads, default ``torch.get_num_threads()``.
    """
    detector = OnnxDetector(path, threads=threads)
    hw = _as_hw(image_size) if image_size is not None else detector.input_shape[1:]
    image = torch.rand(3, *hw, generator=torch.Generator().manual_seed(seed))
    feed = {INPUT_NAME: detector._prepare(image)}
    names = list(OUTPUT_NAMES)

    def run() -> object:
        return detector.session.run(names, feed)

    return run


def onnx_latency(
    path_or_model: str | os.PathLike | nn.Module,
    image_size: int | Sequence[int] | None = None,
    *,
    warmup: int = 2,
    iters: int = 10,
    threads: int | None = None,
) -> float:
    """Median ONNX Runtime (CPU) latency in milliseconds of one image, like
    :func:`~structkd.models.measure_latency` (a random ``[0, 1]`` image, seed 0, the whole
    deployed path: resize, normalise, heads, post-processing).

    ``path_or_model``: an ``.onnx`` file from :func:`export_onnx`, or a detector (exported to a
    temporary file first, at ``image_size``). ``image_size`` defaults to the export's input size.
    The session uses ``threads`` intra-op threads, by default ``torch.get_num_threads()`` -- the
    thread count PyTorch's own measurement runs with -- one inter-op thread and sequential
    execution, so the two numbers compare the runtimes, not thread budgets. Timed by
    :func:`structkd.timing.time_call`: ``warmup`` untimed calls, then ``iters`` timed ones.
    """
    for name, value, minimum in (("warmup", warmup, 0), ("iters", iters, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} is invalid; expected an int >= {minimum}")
    if isinstance(path_or_model, nn.Module):
        with tempfile.TemporaryDirectory(prefix="structkd-onnx-") as tmp:
            file = export_onnx(path_or_model, Path(tmp) / "model.onnx", image_size=image_size)
            return onnx_latency(file, image_size, warmup=warmup, iters=iters, threads=threads)
    run = onnx_runner(path_or_model, image_size, threads=threads)
    return time_call(run, rounds=iters, warmup=warmup).median_ms
