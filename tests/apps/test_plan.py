"""The run keys of the built-in study: what defines a run's result, and nothing else."""

from __future__ import annotations

from structkd.apps.plan import run_key
from structkd.engine import load_config


def test_a_teacher_family_enters_a_runs_key_only_when_set() -> None:
    """At their defaults the teacher-family keys are left out (so runs cached before they
    existed keep their keys: the demo teacher's key is a41a91e's, checked by hand); set, they
    make another run."""
    base = load_config(overrides=["distill.method=ssim", "teacher.checkpoint=t"])
    plain = load_config(overrides=["distill.method=ssim"])
    family = load_config(overrides=["distill.method=ssim", "teacher.family=ultralytics",
                                    "teacher.name=y.pt"])
    options = load_config(overrides=["distill.method=ssim", "teacher.family=ultralytics",
                                     "teacher.name=y.pt", "teacher.options={size: small}"])
    keys = {run_key(c) for c in (base, plain, family, options)}
    assert len(keys) == 4
    assert run_key(plain) == run_key(load_config(overrides=["distill.method=ssim",
                                                            "teacher.options={}"]))
