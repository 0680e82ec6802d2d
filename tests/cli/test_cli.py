"""The ``structkd`` command line end to end: each command through ``structkd.cli.main`` in
this interpreter (``kdtest.cli_inprocess``), and in fresh interpreters where a run needs them
(DDP with two CPU processes).

train -> distill -> eval on the tiny generated COCO dataset, other families through the config,
the shipped configs, DDP with two CPU processes, and the error path (exit code 2 with a one-line
message). The demo and the seed study: ``tests/apps``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdtest import cli_inprocess, cli_subprocess, tiny_overrides
from structkd.recipes import load_config


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def test_train_distill_eval(coco_data, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    out = _ok(cli_inprocess(["train", *_sets(tiny_overrides(
        coco_data, teacher, "model.fpn_channels=32"))]))
    assert out.startswith("# resolved config\n")
    assert "| model | AP | AP50 | AP75 | APs | APm | APl |" in out
    assert f"| {teacher} | " in out
    assert f"student exported to {teacher / 'student'}.safetensors" in out
    assert yaml.safe_load((teacher / "config.yaml").read_text())["model"]["fpn_channels"] == 32

    student = tmp_path / "ssim"
    out = _ok(cli_inprocess(["distill", "--teacher", str(teacher / "student"), "--method",
                             "ssim", *_sets(tiny_overrides(coco_data, student))]))
    resolved = load_config(student / "config.yaml")
    assert resolved.distill.method == "ssim"
    assert resolved.teacher.checkpoint == str(teacher / "student")
    assert json.loads((student / "results.json").read_text())["mode"] == "distill"
    assert f"| {student} | " in out

    metrics_json = tmp_path / "eval.json"
    eval_sets = _sets(tiny_overrides(coco_data, tmp_path / "e"))
    out = _ok(cli_inprocess(["eval", str(student / "student.safetensors"), "--out",
                             str(metrics_json), *eval_sets]))
    metrics = json.loads(metrics_json.read_text())
    saved = json.loads((student / "results.json").read_text())["metrics"]
    assert metrics["AP"] == pytest.approx(saved["AP"], abs=1e-9)
    assert "per-class AP" in out


def test_configs_lists_the_paper_recipes() -> None:
    out = _ok(cli_inprocess(["configs"]))
    for name in ("coco_retinanet_r101_teacher", "coco_retinanet_r50_ssim", "coco_retinanet_r50_l1",
                 "coco_retinanet_r50_l2", "coco_faster_rcnn_r101_teacher",
                 "coco_faster_rcnn_r50_ssim"):
        assert name in out


def test_models_lists_the_families_and_their_builders() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("ultralytics")
    out = _ok(cli_inprocess(["models"]))
    lines = {line.split(" ")[0]: line for line in out.splitlines()}
    assert "'retinanet', 'fcos', 'fasterrcnn'" in lines["torchvision"]
    assert "rt_detr, rt_detr_v2, d_fine" in lines["transformers"]
    assert "yolo11.yaml" in lines["ultralytics"] and "yolo26.yaml" in lines["ultralytics"]
    assert "-seg" not in lines["ultralytics"]


@pytest.mark.parametrize("name", ["coco_retinanet_r50_ssim", "coco_faster_rcnn_r50_l2",
                                  "coco_retinanet_r101_teacher"])
def test_shipped_configs_load(name: str) -> None:
    from structkd.recipes import resolve_config_path

    cfg = load_config(resolve_config_path(name))
    assert cfg.model.min_size == 800 and cfg.schedule.epochs == 12
    assert cfg.data.train_ann and cfg.data.train_ann.endswith("instances_train2017.json")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--set", "model.fpn_chanels=3"], "unknown config key 'model.fpn_chanels'"),
        (["train", "-c", "no_such_config"], "neither a file nor a shipped config"),
        (["eval", "missing/student"], "does not exist"),
        (["distill", "--set", "optim.name=rmsprop"], "optim.name='rmsprop'"),
    ],
)
def test_errors_exit_2_with_a_message(args: list[str], message: str, tmp_path: Path,
                                      monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    proc = cli_inprocess(args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "structkd: error:" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_method_of_a_module_in_distill_imports(coco_data, teacher_run, tmp_path: Path,
                                               monkeypatch) -> None:
    """Regression: ``--method`` took its choices from the registry before ``distill.imports``
    were loaded, so the README's ``--method cosine`` was refused by argparse."""
    from structkd.methods import ALIASES, METHODS
    from test_readme import _block

    (tmp_path / "my_cosine_methods.py").write_text(_block("Add your own method"))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    try:
        proc = cli_inprocess(["distill", "--teacher", str(teacher_run.export_prefix),
                              "--method", "cosine", "--set", "distill.imports=[my_cosine_methods]",
                              *_sets(tiny_overrides(coco_data, out))])
    finally:
        METHODS.pop("cosine", None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distillation: cosine over levels" in proc.stderr
    assert json.loads((out / "results.json").read_text())["method"]["name"] == "cosine"
    # An unknown name is one line naming the registered methods, user ones included.
    proc = cli_inprocess(["distill", "--teacher", str(teacher_run.export_prefix),
                          "--method", "cosin", *_sets(tiny_overrides(coco_data, out))])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("structkd: error: distill.method='cosin': method='cosin' is unknown")
    assert all(m in line for m in [*METHODS, *ALIASES])


def test_config_prints_every_key(tmp_path: Path, monkeypatch) -> None:
    import yaml

    from structkd.recipes import Config

    proc = cli_inprocess(["config", "--set", "optim.lr=0.02"])
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["optim"]["lr"] == 0.02
    assert list(printed) == list(Config().to_dict())
    assert printed["data"]["synthetic"]["num_train"] == 512


def test_distill_without_teacher_is_a_clear_error(coco_data, tmp_path: Path) -> None:
    proc = cli_inprocess(["distill", *_sets(tiny_overrides(coco_data, tmp_path / "x"))])
    assert proc.returncode == 2
    assert "teacher.checkpoint" in proc.stderr


def test_ddp_two_cpu_processes(coco_data, teacher_run, tmp_path: Path) -> None:
    """Distillation under DDP (2 processes, gloo): each rank sees half of the images, the
    evaluation gathers both halves, and only rank 0 writes the export; an auto weight is
    measured with the norms averaged over the ranks, and the ratio is watched every step."""
    out = tmp_path / "ddp"
    proc = cli_subprocess(["distill", "--teacher", str(teacher_run.export_prefix), *_sets(
        tiny_overrides(coco_data, out, "trainer.strategy=ddp", "trainer.devices=2",
                       "schedule.max_steps=null", "schedule.epochs=1", "data.batch_size=2",
                       "data.val_batch_size=1", "distill.weight=auto",
                       "distill.watch_every=1"))], timeout=600)
    _ok(proc)
    results = json.loads((out / "results.json").read_text())
    # 8 images, 2 per rank and step, 2 ranks: 2 optimiser steps for the epoch.
    assert results["steps"] == 2
    cal = results["distill"]["calibration"]
    assert results["distill"]["weight"] == pytest.approx(cal["weight"]) and cal["weight"] > 0
    assert results["distill"]["watch"]["grad_measurements"] == 2
    assert 0 <= results["metrics"]["AP"] <= 100
    assert (out / "student.safetensors").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("teacher_arch", "student_arch"), [
    ("fcos", "retinanet"), ("retinanet", "fcos"), ("fcos", "fasterrcnn")])
def test_slow_pairs_of_detectors_under_ddp(teacher_arch, student_arch, coco_data,
                                           tmp_path: Path) -> None:
    """Every detector as teacher and as student, two epochs under DDP with resume in between:
    the long version of the CI tests above."""
    teacher = tmp_path / "teacher"
    _ok(cli_subprocess(["train", *_sets(tiny_overrides(
        coco_data, teacher, f"model.arch={teacher_arch}", "model.fpn_channels=32",
        "schedule.max_steps=null", "schedule.epochs=2"))], timeout=900))
    student = tmp_path / "student"
    common = [f"model.arch={student_arch}", "trainer.strategy=ddp", "trainer.devices=2",
              "schedule.max_steps=null", "data.batch_size=2"]
    _ok(cli_subprocess(["distill", "--teacher", str(teacher / "student"), *_sets(
        tiny_overrides(coco_data, student, *common, "schedule.epochs=1"))], timeout=900))
    _ok(cli_subprocess(["distill", "--teacher", str(teacher / "student"), *_sets(
        tiny_overrides(coco_data, student, *common, "schedule.epochs=2",
                       "trainer.resume=last"))], timeout=900))
    results = json.loads((student / "results.json").read_text())
    assert results["steps"] == 4 and results["mode"] == "distill"


def test_distill_a_torchvision_teacher_into_a_transformers_student(coco_data, teacher_run,
                                                                    tmp_path: Path) -> None:
    """The config path of another family: model.family=transformers builds an RT-DETR student,
    a RetinaNet export is its teacher; the run prints its table and saves the student twice
    (structkd's safetensors and transformers' save_pretrained folder)."""
    pytest.importorskip("transformers")
    out = tmp_path / "rtdetr"
    proc = cli_inprocess(["distill", "--teacher", str(teacher_run.export_prefix), "--method",
                          "cwd", *_sets(tiny_overrides(
                              coco_data, out, "model.family=transformers",
                              "model.name=rt_detr", "model.size=tiny",
                              "model.options={num_queries: 50}",
                              "distill.options={}", "optim.name=adamw", "optim.lr=0.0001"))])
    printed = _ok(proc)
    assert f"| {out} | " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["method"]["name"] == "cwd" and results["mode"] == "distill"
    assert (out / "student_native" / "config.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["family"] == "transformers"
    # the export is rebuilt from its native save: eval gives the run's AP, and it teaches a
    # torchvision student in turn (a transformers teacher, stopped after its encoder)
    metrics_json = tmp_path / "eval.json"
    _ok(cli_inprocess(["eval", str(out / "student.safetensors"), "--out", str(metrics_json),
                       *_sets(tiny_overrides(coco_data, tmp_path / "e"))]))
    assert json.loads(metrics_json.read_text())["AP"] == pytest.approx(
        results["metrics"]["AP"], abs=1e-9)
    back = tmp_path / "retina_from_rtdetr"
    _ok(cli_inprocess(["distill", "--teacher", str(out / "student"), "--method", "ssim",
                       *_sets(tiny_overrides(coco_data, back))]))
    assert json.loads((back / "results.json").read_text())["mode"] == "distill"


@pytest.mark.slow  # DDP: test_ddp_two_cpu_processes; a cache: tests/distill/test_teacher_cache.py
def test_ddp_two_cpu_processes_from_a_teacher_cache(coco_data, teacher_run,
                                                    tmp_path: Path) -> None:
    """A teacher cache under DDP: each rank looks up its own images' levels; the run trains
    without the teacher and ends like a single-process run would (2 steps, an export)."""
    cache = tmp_path / "cache"
    base = ["data.hflip_prob=0.5"]
    _ok(cli_inprocess(["cache-teacher", "--teacher", str(teacher_run.export_prefix), "--out",
                       str(cache), *_sets(tiny_overrides(coco_data, tmp_path / "x", *base))]))
    out = tmp_path / "ddp"
    proc = cli_subprocess(["distill", *_sets(tiny_overrides(
        coco_data, out, *base, f"teacher.cache={cache}", "trainer.strategy=ddp",
        "trainer.devices=2", "schedule.max_steps=null", "schedule.epochs=1", "data.batch_size=2",
        "data.val_batch_size=1"))], timeout=600)
    printed = _ok(proc)
    assert "the teacher itself is not built" in printed + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and 0 <= results["metrics"]["AP"] <= 100
    assert (out / "student.safetensors").is_file()


def test_distill_a_yolo_teacher_into_a_yolo_student_of_another_generation(
        coco_data, tmp_path: Path) -> None:
    """Ultralytics through the config: a YOLO11 teacher trained by structkd, a YOLO26 student
    distilled from it (the cross-generation pair Ultralytics' own distillation refuses); the
    exports are rebuilt from their YAML + safetensors (no unpickling) for eval."""
    pytest.importorskip("ultralytics")
    yolo = ["model.family=ultralytics", "optim.name=adamw", "optim.lr=0.001"]
    teacher = tmp_path / "yolo11"
    _ok(cli_inprocess(["train", *_sets(tiny_overrides(coco_data, teacher, *yolo,
                                                      "model.name=yolo11n.yaml"))]))
    assert (teacher / "student_native.pt").is_file()
    assert (teacher / "student_native.yaml").is_file()
    out = tmp_path / "yolo26"
    printed = _ok(cli_inprocess(["distill", "--teacher", str(teacher / "student"), "--method",
                                 "mgd", *_sets(tiny_overrides(coco_data, out, *yolo,
                                                              "model.name=yolo26n.yaml"))]))
    assert f"| {out} | " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "distill" and results["method"]["name"] == "mgd"
    metrics_json = tmp_path / "eval.json"
    _ok(cli_inprocess(["eval", str(out / "student.safetensors"), "--out", str(metrics_json),
                       *_sets(tiny_overrides(coco_data, tmp_path / "e"))]))
    assert json.loads(metrics_json.read_text())["AP"] == pytest.approx(
        results["metrics"]["AP"], abs=1e-9)
