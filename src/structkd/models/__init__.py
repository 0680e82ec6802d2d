"""Detector construction, export and measurement helpers."""

from structkd.models.detectors import (
    ARCHS,
    BACKBONES,
    NORMS,
    VARIANTS,
    DetectorSpec,
    build_detector,
    count_parameters,
    export_student,
    load_exported,
    load_torchvision_weights,
    measure_latency,
    neck_channels,
    neck_strides,
    spec_from_json,
    spec_to_json,
)

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
