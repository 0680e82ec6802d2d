"""The run keys of the built-in study: what defines a run's result, and nothing else."""

from __future__ import annotations

from structkd.apps.plan import run_key
from structkd.recipes import load_config


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


def test_an_interrupted_teacher_is_trained_again_in_place(tmp_path, caplog) -> None:
    """The plan's teacher is cached by its key: a finished one is reused; one whose training
    was interrupted (no results, no export) is trained again in its own folder, to the same
    numbers (a tiny plan: 8 images of 64 px, 2 steps; the ``--quick`` teacher in the slow
    ``tests/apps/test_study.py::test_an_interrupted_student_and_teacher_are_resumed``)."""
    from kdtest import IMAGE_SIZE, NUM_TRAIN, NUM_VAL
    from structkd.apps.plan import Plan, ensure_teacher

    plan = Plan(
        data={"synthetic": {"num_train": NUM_TRAIN, "num_val": NUM_VAL,
                            "image_size": IMAGE_SIZE},
              "num_workers": 0, "batch_size": 4, "val_batch_size": 4},
        teacher={"model": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16,
                           "min_size": IMAGE_SIZE, "max_size": IMAGE_SIZE},
                 "schedule": {"epochs": 1, "max_steps": 2, "warmup_iters": 2}},
        student={}, methods={})
    cache = tmp_path / "cache"
    overrides = ["trainer.accelerator=cpu", "trainer.progress=false", "trainer.threads=1"]
    first = ensure_teacher(plan, cache, overrides)
    assert first.out_dir.parent == cache / "teachers" and first.steps == 2
    with caplog.at_level("INFO", logger="structkd.demo"):
        again = ensure_teacher(plan, cache, overrides)
    assert "reusing the cached teacher" in caplog.text
    assert again.out_dir == first.out_dir and again.metrics == first.metrics
    (first.out_dir / "results.json").unlink()
    (first.out_dir / "student.safetensors").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="structkd.demo"):
        third = ensure_teacher(plan, cache, overrides)
    assert "holds an interrupted training of this teacher" in caplog.text
    assert third.out_dir == first.out_dir and third.metrics == first.metrics
    assert (first.out_dir / "student.safetensors").is_file()
    assert len(list((cache / "teachers").iterdir())) == 1
