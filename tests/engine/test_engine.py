"""The training engine end to end through the Python API: train, distil, evaluate, resume.

Every run is tiny (64 px, 8 images, FPN 16, one or two steps) so the whole file stays within a
minute or two on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdtest import distill, train
from structkd.engine.training.module import DetectionModule
from structkd.models import load_detector, load_exported
from structkd.recipes import evaluate_checkpoint as evaluate
from structkd.recipes import load_config

METRIC_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "per_class"}


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_writes_every_artifact(teacher_run) -> None:
    out = teacher_run.out_dir
    for name in ("config.yaml", "results.json", "student.safetensors", "student.json",
                 "metrics.csv", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "train" and results["steps"] == 2
    assert set(results["metrics"]) >= METRIC_KEYS
    assert 0 <= results["metrics"]["AP"] <= 100
    assert teacher_run.metrics["AP"] == results["metrics"]["AP"]
    assert teacher_run.params == results["params"] > 0
    # The saved config is the resolved one and loads back to the same run.
    again = load_config(out / "config.yaml")
    assert again.model.fpn_channels == 32 and again.trainer.seed == 1
    # The export rebuilds the detector that was trained, with its class names.
    model, spec, meta = load_exported(teacher_run.export_prefix)
    assert (spec.arch, spec.backbone, spec.fpn_channels) == ("retinanet", "resnet18", 32)
    assert meta["class_names"][0] == "__background__" and len(meta["class_names"]) == 7
    assert not model.training


def test_export_equals_last_checkpoint(teacher_run) -> None:
    """The safetensors export holds exactly the student weights of the last checkpoint."""
    exported = load_file(str(teacher_run.out_dir / "student.safetensors"))
    state = _ckpt(teacher_run.out_dir / "checkpoints" / "last.ckpt")["state_dict"]
    student = {k.removeprefix("net.student."): v for k, v in state.items()
               if k.startswith("net.student.")}
    assert set(student) == set(exported)
    assert all(torch.equal(student[k], exported[k]) for k in exported)


def test_distill_ssim_checkpoint_has_no_teacher(teacher_run, make_overrides, tmp_path) -> None:
    out = tmp_path / "ssim"
    cfg = load_config(overrides=make_overrides(
        out, f"teacher.checkpoint={teacher_run.export_prefix}", "distill.method=ssim",
        "distill.weight=2.0"))
    result = distill(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "distill" and results["steps"] == 2
    ckpt = _ckpt(out / "checkpoints" / "last.ckpt")
    keys = list(ckpt["state_dict"])
    assert not [k for k in keys if "teacher" in k]
    # Student weights plus the trainable adapters; nothing else.
    assert {k.split(".")[1] for k in keys} == {"student", "method"}
    assert any(k.startswith("net.method.adapters.s8.") for k in keys)
    method = ckpt["structkd"]["method"]
    assert (method["name"], method["weight"]) == ("ssim", 2.0)
    assert [lv["name"] for lv in ckpt["structkd"]["levels"]] == ["s8", "s16", "s32", "s64",
                                                                  "s128"]
    assert len(ckpt["structkd"]["teacher"]["fingerprint"]) == 16
    # The teacher would add its own ~same-size weights: the checkpoint stays student-sized.
    n_student = sum(v.numel() for k, v in ckpt["state_dict"].items() if ".student." in k)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 1.2 * n_student
    # The distillation terms are logged per step, per level.
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/distill", "train/loss", "train/level/s8", "train/level/s128"} <= set(
        header)
    # The export is the plain student detector (no adapters).
    exported = load_file(str(result.export_prefix) + ".safetensors")
    assert not [k for k in exported if "adapters" in k or "teacher" in k]


def test_distill_none_is_the_plain_baseline(teacher_run, make_overrides, tmp_path) -> None:
    out = tmp_path / "none"
    distill(load_config(overrides=make_overrides(
        out, f"teacher.checkpoint={teacher_run.export_prefix}", "distill.method=none")))
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "train"
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train/distill" not in header


def test_evaluate_matches_training_metrics(teacher_run, make_overrides, tmp_path) -> None:
    """Evaluating the export on the same val split reproduces the run's final metrics."""
    cfg = load_config(overrides=make_overrides(tmp_path / "eval"))
    out_json = tmp_path / "eval" / "metrics.json"
    metrics = evaluate(teacher_run.export_prefix, cfg, out_json=out_json)
    assert json.loads(out_json.read_text()) == metrics
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[key] == pytest.approx(teacher_run.metrics[key], abs=1e-9), key
    # A Lightning checkpoint evaluates the same way.
    ckpt_metrics = evaluate(teacher_run.out_dir / "checkpoints" / "last.ckpt", cfg)
    assert ckpt_metrics["AP"] == pytest.approx(metrics["AP"], abs=1e-9)


def test_limit_val_evaluates_only_those_images(teacher_run, make_overrides, tmp_path) -> None:
    """data.limit_val=2: the metrics are those of the first two images alone, the same in the
    run's final validation and in ``evaluate`` (the other images' objects are not 'missed')."""
    from structkd.data import CocoDetection, build_transforms
    from structkd.evaluation import coco_metrics, predictions_to_coco

    cfg = load_config(overrides=make_overrides(tmp_path / "lv", "data.limit_val=2"))
    metrics = evaluate(teacher_run.export_prefix, cfg)
    assert metrics["num_images"] == 2
    model, _, _ = load_exported(teacher_run.export_prefix)
    val = CocoDetection(cfg.data.val_ann, cfg.data.val_images, build_transforms(False))
    images, targets = zip(*(val[i] for i in range(2)), strict=True)
    ids = [t["image_id"] for t in targets]
    with torch.no_grad():
        dets = predictions_to_coco(model(list(images)), ids, val.label_to_cat_id)
    expected = coco_metrics(val.coco_gt, dets, image_ids=ids)
    assert metrics["AP"] == pytest.approx(expected["AP"], abs=1e-9)
    assert metrics["AR100"] == pytest.approx(expected["AR100"], abs=1e-9)


def _student_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student.safetensors"))


def test_resume_is_exact(teacher_run, make_overrides, tmp_path) -> None:
    """2 epochs in one go == 1 epoch, stop, resume from last.ckpt for the 2nd epoch."""
    common = (f"teacher.checkpoint={teacher_run.export_prefix}", "distill.method=ssim",
              "schedule.max_steps=null", "data.limit_train=8", "schedule.warmup_iters=1",
              "trainer.deterministic=true")
    full = tmp_path / "full"
    distill(load_config(overrides=make_overrides(full, *common, "schedule.epochs=2")))
    part = tmp_path / "part"
    distill(load_config(overrides=make_overrides(part, *common, "schedule.epochs=1")))
    first = _student_state(part)
    distill(load_config(overrides=make_overrides(part, *common, "schedule.epochs=2",
                                                 "trainer.resume=last")))
    resumed, straight = _student_state(part), _student_state(full)
    assert json.loads((part / "results.json").read_text())["steps"] == 4
    assert any(not torch.equal(first[k], resumed[k]) for k in first)  # it did train on
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("extra", [("trainer.val_every=0",), ("schedule.max_steps=1",)])
def test_checkpoint_written_without_validation_and_on_early_stop(extra, make_overrides,
                                                                 tmp_path) -> None:
    """last.ckpt exists when no validation runs while fitting, and when max_steps ends the run
    in the middle of an epoch."""
    out = tmp_path / "run"
    train(load_config(overrides=make_overrides(out, *extra)))
    ckpt = _ckpt(out / "checkpoints" / "last.ckpt")
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert ckpt["global_step"] == steps


def test_resume_missing_checkpoint_is_a_clear_error(make_overrides, tmp_path) -> None:
    cfg = load_config(overrides=make_overrides(tmp_path / "fresh", "trainer.resume=last"))
    with pytest.raises(FileNotFoundError, match=r"trainer.resume='last'.*last\.ckpt"):
        train(cfg)


@pytest.mark.parametrize("arch", ["fcos", "fasterrcnn"])
def test_train_other_detectors(arch, make_overrides, tmp_path) -> None:
    result = train(load_config(overrides=make_overrides(tmp_path / arch, f"model.arch={arch}")))
    _, spec, _ = load_exported(result.export_prefix)
    assert spec.arch == arch
    assert set(result.metrics) >= METRIC_KEYS


def test_heterogeneous_pair_retinanet_teacher_fasterrcnn_student(
    teacher_run, make_overrides, tmp_path
) -> None:
    """Different architectures and widths (FPN 32 -> 16) pair by stride through adapters."""
    out = tmp_path / "hetero"
    distill(load_config(overrides=make_overrides(
        out, f"teacher.checkpoint={teacher_run.export_prefix}", "model.arch=fasterrcnn",
        "distill.method=mse")))
    ckpt = _ckpt(out / "checkpoints" / "last.ckpt")
    adapters = {k.split(".")[3] for k in ckpt["state_dict"] if ".adapters." in k}
    assert adapters == {"s8", "s16", "s32", "s64"}  # stride 4 and 128 exist on one side only
    w = ckpt["state_dict"]["net.method.adapters.s8.weight"]
    assert tuple(w.shape) == (32, 16, 1, 1)


def test_teacher_with_other_class_count_is_rejected(teacher_run, make_overrides, tmp_path,
                                                    coco_data) -> None:
    """A teacher trained on another label set fails before training, naming both counts."""
    from structkd.models import build_detector, export_student

    spec = {"arch": "retinanet", "num_classes": 4, "backbone": "resnet18", "fpn_channels": 16,
            "min_size": 64, "max_size": 64}
    prefix = tmp_path / "other" / "teacher"
    names = ["__background__", "a", "b", "c"]
    export_student(build_detector(spec), spec, prefix, extra_meta={
        "class_names": names, "label_to_cat_id": {"1": 1, "2": 2, "3": 3}})
    cfg = load_config(overrides=make_overrides(tmp_path / "x", f"teacher.checkpoint={prefix}"))
    with pytest.raises(ValueError, match=r"trained on other classes.*\(3 vs 6 classes\)"):
        distill(cfg)
    # Distilling from its neck anyway is allowed on request.
    cfg = load_config(overrides=make_overrides(
        tmp_path / "y", f"teacher.checkpoint={prefix}", "teacher.strict_classes=false"))
    assert distill(cfg).metrics["AP"] >= 0


def test_evaluate_with_other_class_count_is_rejected(make_overrides, tmp_path) -> None:
    from structkd.models import build_detector, export_student

    spec = {"arch": "retinanet", "num_classes": 3, "backbone": "resnet18", "fpn_channels": 16,
            "min_size": 64, "max_size": 64}
    prefix = tmp_path / "m" / "student"
    export_student(build_detector(spec), spec, prefix)
    with pytest.raises(ValueError, match=r"num_classes=3 but the dataset has 7"):
        evaluate(prefix, load_config(overrides=make_overrides(tmp_path / "e")))


def test_not_a_structkd_checkpoint(tmp_path) -> None:
    bad = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match=r"foreign\.ckpt is not a checkpoint of a structkd"):
        load_detector(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt does not exist"):
        load_detector(tmp_path / "missing.ckpt")


def test_nan_loss_stops_with_step_and_terms_and_keeps_last_checkpoint(
    make_overrides, tmp_path, monkeypatch
) -> None:
    """A non-finite loss stops the run naming the step and every loss term; the checkpoint of
    the last completed epoch survives."""
    calls = {"n": 0}
    original = DetectionModule.training_step

    def poisoned(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 2:  # the first step of the second epoch
            real = self.net.forward

            def nan_forward(images, targets):
                losses = real(images, targets)
                losses["classification"] = losses["classification"] * float("nan")
                return losses

            monkeypatch.setattr(self.net, "forward", nan_forward)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DetectionModule, "training_step", poisoned)
    out = tmp_path / "nan"
    cfg = load_config(overrides=make_overrides(
        out, "schedule.max_steps=null", "schedule.epochs=3", "data.limit_train=4"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(epoch 1\)") as e:
        train(cfg)
    assert "'classification': nan" in str(e.value) and "bbox_regression" in str(e.value)
    assert "last.ckpt, holds step 1 (every step up to it passed this check) and is kept" in \
        str(e.value)
    ckpt = _ckpt(out / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 1


def test_bf16_mixed_precision_distill(teacher_run, make_overrides, tmp_path) -> None:
    """Lightning's bf16 autocast on CPU: the SSIM term runs in fp32 and the run completes.

    Inputs are resized to 128 px: at 64 px P6 is 1x1 and oneDNN's bf16 backward of the P7 conv
    returns random garbage gradients (``cpu_bf16_hazard``), which made this test flaky.
    """
    out = tmp_path / "bf16"
    result = distill(load_config(overrides=make_overrides(
        out, f"teacher.checkpoint={teacher_run.export_prefix}", "distill.method=ssim",
        "trainer.precision=bf16-mixed", "model.min_size=128", "model.max_size=128")))
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("train/distill")
    values = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert values and all(0 < v < 2 * 5 for v in values)  # lambda=2, five levels, each in [0, 1]
    assert result.metrics["AP"] >= 0


def test_cpu_bf16_hazard_is_named_for_small_inputs_only(make_overrides, tmp_path) -> None:
    from structkd.engine.monitor.hazards import cpu_bf16_hazard
    from structkd.models import DetectorSpec

    def hazard(precision: str, size: int, arch: str = "retinanet") -> str | None:
        cfg = load_config(overrides=make_overrides(tmp_path, f"trainer.precision={precision}"))
        return cpu_bf16_hazard(cfg.trainer, DetectorSpec(arch=arch, num_classes=7, min_size=size))

    message = hazard("bf16-mixed", 64)
    assert message is not None and "model.min_size=64" in message and "32-true" in message
    assert hazard("bf16-mixed", 128) is None
    assert hazard("32-true", 64) is None
    assert hazard("bf16-mixed", 64, arch="fasterrcnn") is None  # P6 by max-pool, no conv


def test_eval_warns_when_the_config_describes_another_architecture(teacher_run, make_overrides,
                                                                   tmp_path, caplog) -> None:
    """``eval -c`` with a config for FCOS on a RetinaNet export: evaluated as saved, with a
    warning that names both."""
    cfg = load_config(overrides=make_overrides(tmp_path / "e", "model.arch=fcos"))
    with caplog.at_level("WARNING", logger="structkd.engine"):
        metrics = evaluate(teacher_run.export_prefix, cfg)
    assert "describes a fcos/resnet18" in caplog.text and "is a retinanet/resnet18" in caplog.text
    assert metrics["AP"] == pytest.approx(teacher_run.metrics["AP"], abs=1e-9)
