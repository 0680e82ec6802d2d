"""The wiring of one distillation step: taps, level pairing, the frozen teacher, the Distiller."""

from .distiller import DetectorLosses, Distiller, detector_family
from .pairing import DRY_RUN_SIZE, LevelInfo, LevelPair, measure_levels, pair_levels
from .taps import FeatureTap, as_levels, find_module, unwrap
from .teacher import (
    TEACHER_DTYPES,
    FrozenTeacher,
    TeacherDtype,
    as_dtype,
    fused_copy,
    weights_fingerprint,
)

__all__ = [
    "DRY_RUN_SIZE",
    "TEACHER_DTYPES",
    "DetectorLosses",
    "Distiller",
    "FeatureTap",
    "FrozenTeacher",
    "LevelInfo",
    "LevelPair",
    "TeacherDtype",
    "as_dtype",
    "as_levels",
    "detector_family",
    "find_module",
    "fused_copy",
    "measure_levels",
    "pair_levels",
    "unwrap",
    "weights_fingerprint",
]
