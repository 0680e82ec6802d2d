"""The ``structkd`` command line end to end, each command in a fresh interpreter.

train -> distill -> eval on the tiny generated COCO dataset, the shipped configs, DDP with two CPU
processes, the demo's smoke run, and the error path (exit code 2 with a one-line message).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from kdtest import cli_inprocess, cli_subprocess, tiny_overrides
from structkd.engine import load_config


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def test_train_distill_eval(coco_data, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    out = _ok(cli_subprocess(["train", *_sets(tiny_overrides(
        coco_data, teacher, "model.fpn_channels=32"))]))
    assert out.startswith("# resolved config\n")
    assert "| model | AP | AP50 | AP75 | APs | APm | APl |" in out
    assert f"| {teacher} | " in out
    assert f"student exported to {teacher / 'student'}.safetensors" in out
    assert yaml.safe_load((teacher / "config.yaml").read_text())["model"]["fpn_channels"] == 32

    student = tmp_path / "ssim"
    out = _ok(cli_subprocess(["distill", "--teacher", str(teacher / "student"), "--method",
                              "ssim", *_sets(tiny_overrides(coco_data, student))]))
    resolved = load_config(student / "config.yaml")
    assert resolved.distill.method == "ssim"
    assert resolved.teacher.checkpoint == str(teacher / "student")
    assert json.loads((student / "results.json").read_text())["mode"] == "distill"
    assert f"| {student} | " in out

    metrics_json = tmp_path / "eval.json"
    eval_sets = _sets(tiny_overrides(coco_data, tmp_path / "e"))
    out = _ok(cli_subprocess(["eval", str(student / "student.safetensors"), "--out",
                              str(metrics_json), *eval_sets]))
    metrics = json.loads(metrics_json.read_text())
    saved = json.loads((student / "results.json").read_text())["metrics"]
    assert metrics["AP"] == pytest.approx(saved["AP"], abs=1e-9)
    assert "per-class AP" in out


def test_configs_lists_the_paper_recipes() -> None:
    out = _ok(cli_subprocess(["configs"]))
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
    from structkd.cli import resolve_config_path

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

    from structkd.engine import Config

    proc = cli_inprocess(["config", "--set", "optim.lr=0.02"])
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["optim"]["lr"] == 0.02
    assert list(printed) == list(Config().to_dict())
    assert printed["data"]["synthetic"]["num_train"] == 512


def test_distill_without_teacher_is_a_clear_error(coco_data, tmp_path: Path) -> None:
    proc = cli_subprocess(["distill", *_sets(tiny_overrides(coco_data, tmp_path / "x"))])
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


def test_demo_quick(tmp_path: Path) -> None:
    """The demo's smoke run: teacher, three students, table, report, JSON and plots."""
    out, cache = tmp_path / "demo", tmp_path / "cache"
    proc = cli_subprocess(["demo", "--quick", "--out", str(out), "--cache", str(cache)],
                          timeout=900)
    stdout = _ok(proc)
    for name in ("teacher", "student-none", "student-mse", "student-ssim"):
        assert f"| {name} |" in stdout
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "student-none", "student-mse",
                                         "student-ssim"]
    keys = {"name", "method", "AP", "AP50", "AP75", "APs", "APm", "APl", "params", "latency_ms",
            "onnx_ms"}
    assert all(keys <= set(r) for r in rows)
    assert all(r["latency_ms"] > 0 and r["onnx_ms"] > 0 for r in rows)
    for png in ("ap_per_method.png", "curves.png", "detections.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert report.startswith("# structkd demo") and "![detections](detections.png)" in report
    assert "Size gap: student" in stdout
    assert (out / "student.onnx").is_file() and (out / "teacher.onnx").is_file()
    # The table and the paths of the report and figures are the last lines printed.
    lines = stdout.strip().splitlines()
    at = lines.index(f"report: {out / 'report.md'}")
    figures = [Path(line.removeprefix("figure: ")) for line in lines[at + 1:]]
    assert all(line.startswith("figure: ") for line in lines[at + 1:]) and len(figures) >= 3
    assert all(f.is_file() for f in figures)
    # A clean console: no Lightning advert, no log message printed twice in a row, no
    # Lightning information lines or known harmless warnings between the demo's own lines.
    log = [ln for ln in proc.stderr.splitlines() if ln.startswith(("INFO", "WARNING"))]
    assert "litlogger" not in proc.stderr.lower() and "Tip:" not in proc.stderr
    assert not [a for a, b in itertools.pairwise(log) if a == b]
    assert "LeafSpec" not in proc.stderr and "exists and is not empty" not in proc.stderr
    assert not [ln for ln in log if "lightning" in ln]
    # A second demo into the same folder reuses the cached teacher, keeps the first demo and
    # reports its own students (another seed), read from the folder it wrote them to.
    first = (out / "results.json").read_bytes()
    proc = cli_subprocess(["demo", "--quick", "--out", str(out), "--cache", str(cache),
                           "--seed", "1"], timeout=900)
    _ok(proc)
    assert "reusing the cached teacher" in proc.stderr
    assert len(list((cache / "teachers").iterdir())) == 1
    second = tmp_path / "demo-2"
    assert f"this one goes to {second}" in proc.stderr
    assert (out / "results.json").read_bytes() == first
    rows2 = json.loads((second / "results.json").read_text())
    for r in rows2[1:]:
        run = json.loads((second / r["method"] / "results.json").read_text())
        assert r["AP"] == run["metrics"]["AP"] and r["params"] == run["params"]
        assert run["out_dir"] == str(second / r["method"])
    assert f"report: {second / 'report.md'}" in proc.stdout
    assert not list(out.glob("*-2"))  # no run of the second demo went into the first


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


def test_benchmark_quick_writes_results_and_resumes(tmp_path: Path) -> None:
    """The seed study's smoke run: RESULTS.md with the command, the table and the verdict;
    run again, it reuses every finished run instead of training it again."""
    args = ["benchmark", "--quick", "--seeds", "2", "--methods", "none", "ssim", "--out",
            str(tmp_path / "study"), "--cache", str(tmp_path / "cache"), "--results-md",
            str(tmp_path / "RESULTS.md")]
    _ok(cli_subprocess(args, timeout=900))
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Seed study on the built-in dataset")
    assert "Command: `structkd benchmark --seeds 2 --quick`" in text
    assert "| none | - | 2 |" in text and "| ssim | 2 | 2 |" in text
    assert "SSIM - none:" in text and "| teacher |" in text
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["rows"]["ssim"]["n"] == 2 and len(summary["rows"]["ssim"]["AP_runs"]) == 2
    # Interrupt one student run and the teacher's training (as a kill would leave them): run
    # again, the study reuses the three finished runs, resumes the student from its last
    # checkpoint and trains the teacher again in place, to the same numbers as the
    # uninterrupted first invocation.
    for d in (tmp_path / "study" / "seed1" / "ssim", *(tmp_path / "cache" / "teachers").iterdir()):
        (d / "results.json").unlink()
        (d / "student.safetensors").unlink()
    again = cli_subprocess(args, timeout=900)
    _ok(again)
    assert again.stderr.count("reusing the finished run") == 3
    assert "resuming the interrupted run in" in again.stderr
    assert "holds an interrupted training of this teacher" in again.stderr
    assert "3 of the 4 student runs were reused" in (tmp_path / "RESULTS.md").read_text()
    assert "were reused" not in text  # the first invocation trained every run
    assert sorted(p.name for p in (tmp_path / "study" / "seed1").iterdir()) == ["none", "ssim"]
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 1
    resumed = json.loads((tmp_path / "study" / "summary.json").read_text())
    for m in ("none", "ssim"):
        assert resumed["rows"][m]["AP_runs"] == summary["rows"][m]["AP_runs"]
    assert resumed["teacher"]["metrics"] == summary["teacher"]["metrics"]


def test_distill_a_torchvision_teacher_into_a_transformers_student(coco_data, teacher_run,
                                                                    tmp_path: Path) -> None:
    """The config path of another family: model.family=transformers builds an RT-DETR student,
    a RetinaNet export is its teacher; the run prints its table and saves the student twice
    (structkd's safetensors and transformers' save_pretrained folder)."""
    pytest.importorskip("transformers")
    out = tmp_path / "rtdetr"
    proc = cli_subprocess(["distill", "--teacher", str(teacher_run.export_prefix), "--method",
                           "cwd", *_sets(tiny_overrides(
                               coco_data, out, "model.family=transformers",
                               "model.name=rt_detr", "model.size=tiny",
                               "model.options={num_queries: 50}",
                               "distill.options={}", "optim.name=adamw", "optim.lr=0.0001"))],
                          timeout=600)
    printed = _ok(proc)
    assert f"| {out} | " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["method"]["name"] == "cwd" and results["mode"] == "distill"
    assert (out / "student_native" / "config.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["family"] == "transformers"
    # the export is rebuilt from its native save: eval gives the run's AP, and it teaches a
    # torchvision student in turn (a transformers teacher, stopped after its encoder)
    metrics_json = tmp_path / "eval.json"
    _ok(cli_subprocess(["eval", str(out / "student.safetensors"), "--out", str(metrics_json),
                        *_sets(tiny_overrides(coco_data, tmp_path / "e"))]))
    assert json.loads(metrics_json.read_text())["AP"] == pytest.approx(
        results["metrics"]["AP"], abs=1e-9)
    back = tmp_path / "retina_from_rtdetr"
    _ok(cli_subprocess(["distill", "--teacher", str(out / "student"), "--method", "ssim",
                        *_sets(tiny_overrides(coco_data, back))], timeout=600))
    assert json.loads((back / "results.json").read_text())["mode"] == "distill"


def test_ddp_two_cpu_processes_from_a_teacher_cache(coco_data, teacher_run,
                                                    tmp_path: Path) -> None:
    """A teacher cache under DDP: each rank looks up its own images' levels; the run trains
    without the teacher and ends like a single-process run would (2 steps, an export)."""
    cache = tmp_path / "cache"
    base = ["data.hflip_prob=0.5"]
    _ok(cli_subprocess(["cache-teacher", "--teacher", str(teacher_run.export_prefix), "--out",
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
    _ok(cli_subprocess(["train", *_sets(tiny_overrides(coco_data, teacher, *yolo,
                                                       "model.name=yolo11n.yaml"))],
                       timeout=600))
    assert (teacher / "student_native.pt").is_file()
    assert (teacher / "student_native.yaml").is_file()
    out = tmp_path / "yolo26"
    printed = _ok(cli_subprocess(["distill", "--teacher", str(teacher / "student"), "--method",
                                  "mgd", *_sets(tiny_overrides(coco_data, out, *yolo,
                                                               "model.name=yolo26n.yaml"))],
                                 timeout=600))
    assert f"| {out} | " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "distill" and results["method"]["name"] == "mgd"
    metrics_json = tmp_path / "eval.json"
    _ok(cli_subprocess(["eval", str(out / "student.safetensors"), "--out", str(metrics_json),
                        *_sets(tiny_overrides(coco_data, tmp_path / "e"))]))
    assert json.loads(metrics_json.read_text())["AP"] == pytest.approx(
        results["metrics"]["AP"], abs=1e-9)
