"""Ship a detector as ONNX: the deployed path (resize, normalise, backbone, heads, box decoding,
NMS) in one graph that ONNX Runtime runs without PyTorch.

The graph takes **one** image, a ``float32`` tensor ``(3, H, W)`` with values in ``[0, 1]`` (RGB,
not normalised: torchvision's transform inside the graph normalises and resizes it), and returns
``boxes`` ``(N, 4)`` (``x1, y1, x2, y2`` in input pixels), ``scores`` ``(N,)`` and ``labels``
``(N,)`` (int64, contiguous labels ``1..K``; map them to dataset category ids with the label
map). One image per run is what torchvision's detectors export robustly (their own ONNX tests do
the same); a batch is a loop over images (:class:`OnnxDetector` does it).

Two modules: ``export`` writes the graph and its metadata (:func:`export_onnx`,
:func:`export_run`, :func:`read_onnx_metadata`); ``runtime`` runs it in ONNX Runtime
(:class:`OnnxDetector`, :func:`onnx_runner`, :func:`onnx_latency`).
"""

from .export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    METADATA_KEY,
    ONNX_FORMAT,
    OUTPUT_NAMES,
    default_image_size,
    export_onnx,
    export_run,
    read_onnx_metadata,
)
from .runtime import OnnxDetector, onnx_latency, onnx_runner

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "METADATA_KEY",
    "ONNX_FORMAT",
    "OUTPUT_NAMES",
    "OnnxDetector",
    "default_image_size",
    "export_onnx",
    "export_run",
    "onnx_latency",
    "onnx_runner",
    "read_onnx_metadata",
]
