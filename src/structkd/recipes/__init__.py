"""The YAML path, above the engine: the experiment file's schema, derived from the API's
signatures and option types (:mod:`.schema`); running a config (:mod:`.from_config`: it builds
the objects and calls ``structkd.fit``); the teacher cache from a config (:mod:`.cache_config`);
the recipes shipped as ``structkd/configs/*.yaml`` (:mod:`.shipped`, ``structkd configs``)."""

from .cache_config import open_teacher_cache
from .from_config import build_run, cache_teacher, evaluate_checkpoint, load_teacher, run_config
from .schema import Config, TeacherSource, load_config, teacher_fields
from .shipped import resolve_config_path, shipped_configs

__all__ = ["Config", "TeacherSource", "build_run", "cache_teacher", "evaluate_checkpoint",
           "load_config", "load_teacher", "open_teacher_cache", "resolve_config_path",
           "run_config", "shipped_configs", "teacher_fields"]
