"""Detector families: the protocol the engine speaks and one adapter per family."""

from .base import (
    Adapter,
    DetectorFamily,
    FamilyInfo,
    WrappedDetector,
    adapters,
    as_detector,
    builds_random_weights,
    class_count,
    describe_families,
    detector_family,
    family_defaults,
    family_detector,
    register_adapter,
    remove_hooks,
)
from .transformers import TransformersDetector, is_transformers_detector

__all__ = [
    "Adapter",
    "DetectorFamily",
    "FamilyInfo",
    "TransformersDetector",
    "WrappedDetector",
    "adapters",
    "as_detector",
    "builds_random_weights",
    "class_count",
    "describe_families",
    "detector_family",
    "family_defaults",
    "family_detector",
    "is_transformers_detector",
    "register_adapter",
    "remove_hooks",
]
