"""Detectors: the spec that describes one, building it, weights, export and latency."""

from .build import build_detector, count_parameters, neck_channels
from .create import detector
from .export import EXPORT_FORMAT, export_student
from .latency import measure_latency, torch_runner
from .load import DetectorInfo, load_detector, load_exported, torchvision_detector
from .onnx import (
    OnnxDetector,
    export_onnx,
    export_run,
    onnx_latency,
    onnx_runner,
    read_onnx_metadata,
)
from .spec import ARCHS, BACKBONES, NORMS, VARIANTS, DetectorSpec, spec_from_json, spec_to_json
from .weights import load_torchvision_weights

__all__ = [
    "ARCHS",
    "BACKBONES",
    "EXPORT_FORMAT",
    "NORMS",
    "VARIANTS",
    "DetectorInfo",
    "DetectorSpec",
    "OnnxDetector",
    "build_detector",
    "count_parameters",
    "detector",
    "export_onnx",
    "export_run",
    "export_student",
    "load_detector",
    "load_exported",
    "load_torchvision_weights",
    "measure_latency",
    "neck_channels",
    "onnx_latency",
    "onnx_runner",
    "read_onnx_metadata",
    "spec_from_json",
    "spec_to_json",
    "torch_runner",
    "torchvision_detector",
]
