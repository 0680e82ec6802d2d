"""Head-level methods train end to end through structkd's engine (the config path a user runs),
for each family they claim: RetinaNet -> FCOS (torchvision, across anchor layouts), YOLO11 ->
YOLO11 and -> YOLO26 (Ultralytics); ``weight: auto`` measures each; a teacher cache is refused
with the method's name."""

from __future__ import annotations

import math

import pytest

from kdtest import tiny_overrides
from structkd.recipes import load_config, run_config


def _run(coco_data, out, *extra):
    return run_config(load_config(overrides=tiny_overrides(coco_data, out, *extra)))


def _terms(result) -> dict[str, list[float]]:
    """The distillation terms logged at each step."""
    return {k.removeprefix("train/"): [v for _, v in pts] for k, pts in result.history.items()
            if k.startswith("train/distill") and k != "train/distill_weight"}


@pytest.mark.parametrize(("method", "weight", "terms", "head_trained"),
                         [("scoreweighted", None, ["distill"], False),
                          ("bckd", "auto", ["distill/cls", "distill/loc"], True)])
def test_torchvision_students_train_with_head_methods(coco_data, teacher_run, tmp_path, method,
                                                       weight, terms, head_trained) -> None:
    """A RetinaNet teacher (9 anchors per location) teaches an FCOS student (1): the teacher's
    best anchor per location is the target."""
    more = [] if weight is None else [f"distill.weight={weight}"]
    result = _run(coco_data, tmp_path / method, "model.arch=fcos", f"distill.method={method}",
                  *more, f"teacher.checkpoint={teacher_run.export_prefix}")
    assert result.steps == 2
    logged = _terms(result)
    assert sorted(logged) == sorted(terms)
    assert all(len(v) == 2 and all(math.isfinite(x) and x > 0 for x in v)
               for v in logged.values())
    # the distillation's gradient reaches the student's head only where the head is distilled
    reached = result.distill["start_check"]["reached_groups"]
    assert any(g.startswith("head.") for g in reached) == head_trained
    assert "backbone.fpn" in reached
    if weight == "auto":
        calibration = result.distill["calibration"]
        assert result.distill["weight"] == calibration["weight"] > 0


def test_crosskd_trains_a_retinanet_student_through_its_teachers_head(coco_data, teacher_run,
                                                                     tmp_path) -> None:
    """RetinaNet (FPN 16) -> RetinaNet (FPN 32): the student's head features at the cut go
    through the teacher's head (1x1 adapters to its width), which trains the student's first
    head layers, not its predictors."""
    result = _run(coco_data, tmp_path / "crosskd", "distill.method=crosskd",
                  f"teacher.checkpoint={teacher_run.export_prefix}")
    assert result.steps == 2
    logged = _terms(result)
    assert sorted(logged) == ["distill/cls", "distill/loc"]
    assert all(all(math.isfinite(x) and x > 0 for x in v) for v in logged.values())
    assert "head.classification_head" in result.distill["start_check"]["reached_groups"]


@pytest.mark.parametrize(("student", "method"), [("yolo11n.yaml", "ld"),
                                                 ("yolo26n.yaml", "bckd")])
def test_ultralytics_students_train_with_head_methods(coco_data, tmp_path, student,
                                                      method) -> None:
    pytest.importorskip("ultralytics")
    teacher = _run(coco_data, tmp_path / "teacher", "model.family=ultralytics",
                   "model.name=yolo11n.yaml", "distill.method=none")
    result = _run(coco_data, tmp_path / "student", "model.family=ultralytics",
                  f"model.name={student}", f"distill.method={method}",
                  f"teacher.checkpoint={teacher.export_prefix}")
    assert result.steps == 2
    logged = _terms(result)
    assert logged and all(all(math.isfinite(x) for x in v) for v in logged.values())
    assert any(x > 0 for v in logged.values() for x in v)


def test_a_feature_and_a_head_method_together_auto_weighted_and_resumed(
        coco_data, teacher_run, tmp_path) -> None:
    """``mgd+bckd`` at ``weight: auto``: each part's weight is measured as if it were alone
    (its gradient pulls at the ratio times the detection's), the overall weight is 1, the
    terms are logged per part; 2 epochs at once == 1 epoch, stop, resume (the part weights
    travel in the checkpoint)."""
    import torch
    from safetensors.torch import load_file

    def cfg(out, *more):
        return load_config(overrides=tiny_overrides(
            coco_data, out, "model.arch=fcos", "distill.method=mgd+bckd", "distill.weight=auto",
            f"teacher.checkpoint={teacher_run.export_prefix}", "schedule.max_steps=null",
            "schedule.warmup_iters=1", *more))

    whole = run_config(cfg(tmp_path / "whole", "schedule.epochs=2"))
    assert whole.distill["weight"] == 1.0
    parts = whole.distill["calibration"]["parts"]
    assert set(parts) == {"mgd", "bckd"} and all(p["weight"] > 0 for p in parts.values())
    ratio = whole.distill["calibration"]["ratio"]
    for p in parts.values():  # weight = ratio * |g_det| / |g_part at weight 1|, on the
        # parameters both reach (BCKD's reach the head, MGD's do not)
        assert p["weight"] == pytest.approx(ratio * p["detection_norm"] / p["unit_distill_norm"],
                                            rel=1e-6)
    assert parts["mgd"]["detection_norm"] != parts["bckd"]["detection_norm"]
    assert sorted(_terms(whole)) == ["distill/bckd/cls", "distill/bckd/loc", "distill/mgd"]
    run_config(cfg(tmp_path / "part", "schedule.epochs=1"))
    resumed = run_config(cfg(tmp_path / "part", "schedule.epochs=2", "trainer.resume=last"))
    assert whole.steps == resumed.steps == 4
    a = load_file(f"{whole.export_prefix}.safetensors")
    b = load_file(f"{resumed.export_prefix}.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_an_rtdetr_student_trains_with_detr_kd(coco_data, tmp_path) -> None:
    """transformers RT-DETR -> RT-DETR: the teacher runs whole on the student's batch; the
    terms per decoder layer are logged; the term moves the student."""
    pytest.importorskip("transformers")
    family = ["model.family=transformers", "model.name=rt_detr",
              "model.options={num_queries: 50}"]
    teacher = _run(coco_data, tmp_path / "teacher", *family, "distill.method=none")
    result = _run(coco_data, tmp_path / "student", *family, "distill.method=detr_kd",
                  f"teacher.checkpoint={teacher.export_prefix}")
    assert result.steps == 2
    logged = _terms(result)
    assert sorted(logged) == ["distill/cls", "distill/giou", "distill/l1"]
    assert all(all(math.isfinite(x) and x > 0 for x in v) for v in logged.values())
    check = result.distill["start_check"]
    assert check["term"] > 0 and check["grad_norm"] > 0
    layers = [k for k in result.history if k.startswith("train/level/layer")]
    assert len(layers) >= 2
