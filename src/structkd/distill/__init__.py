"""The wiring of one distillation step: taps, level pairing, the frozen teacher, the Distiller."""

from .balance import (
    DEFAULT_RATIO,
    Calibration,
    GradNorms,
    calibrate_weight,
    grad_norms,
    preserved_state,
    split_losses,
    student_parameters,
)
from .distiller import DetectorLosses, Distiller, detector_family
from .liveness import check_distillation
from .pairing import DRY_RUN_SIZE, LevelInfo, LevelPair, measure_levels, pair_levels
from .taps import FeatureTap, as_levels, find_module, unwrap
from .teacher import (
    TEACHER_DTYPES,
    FrozenTeacher,
    TeacherDtype,
    as_dtype,
    fused_copy,
    tensors_fingerprint,
    weights_fingerprint,
)
from .teacher_cache import (
    CACHE_DTYPES,
    TeacherCache,
    cache_key,
    file_digest,
    write_teacher_cache,
)

__all__ = [
    "CACHE_DTYPES",
    "DEFAULT_RATIO",
    "DRY_RUN_SIZE",
    "TEACHER_DTYPES",
    "Calibration",
    "DetectorLosses",
    "Distiller",
    "FeatureTap",
    "FrozenTeacher",
    "GradNorms",
    "LevelInfo",
    "LevelPair",
    "TeacherCache",
    "TeacherDtype",
    "as_dtype",
    "as_levels",
    "cache_key",
    "calibrate_weight",
    "check_distillation",
    "detector_family",
    "file_digest",
    "find_module",
    "fused_copy",
    "grad_norms",
    "measure_levels",
    "pair_levels",
    "preserved_state",
    "split_losses",
    "student_parameters",
    "tensors_fingerprint",
    "unwrap",
    "weights_fingerprint",
    "write_teacher_cache",
]
