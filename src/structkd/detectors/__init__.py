"""Detector families: the protocol structkd speaks (:mod:`.protocol`), the registry every family
adds its adapter to (:mod:`.registry`), and one module per family: torchvision's detectors as
they are (:mod:`.torchvision`), transformers' DETR family (:mod:`.transformers`,
:mod:`.transformers_build`) and Ultralytics' (:mod:`.ultralytics`, :mod:`.ultralytics_build`;
the optional AGPL-3.0 package is imported only when used). Importing this package registers
them; a family of your own registers itself the same way (:func:`register_adapter`)."""

from . import torchvision as _torchvision  # noqa: F401  (registers the fallback adapter)
from . import transformers_build as _transformers  # noqa: F401  (registers the family)
from . import ultralytics_build as _ultralytics  # noqa: F401  (registers the family)
from .protocol import Detector, WrappedDetector, remove_hooks, unwrap
from .registry import (
    Adapter,
    DetectorFamily,
    FamilyInfo,
    adapters,
    as_detector,
    builds_random_weights,
    claiming_family,
    class_count,
    describe_families,
    detector_family,
    family_defaults,
    family_detector,
    protocol_of,
    register_adapter,
)
from .transformers import TransformersDetector, is_transformers_detector

__all__ = [
    "Adapter",
    "Detector",
    "DetectorFamily",
    "FamilyInfo",
    "TransformersDetector",
    "WrappedDetector",
    "adapters",
    "as_detector",
    "builds_random_weights",
    "claiming_family",
    "class_count",
    "describe_families",
    "detector_family",
    "family_defaults",
    "family_detector",
    "is_transformers_detector",
    "protocol_of",
    "register_adapter",
    "remove_hooks",
    "unwrap",
]
