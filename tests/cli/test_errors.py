"""Bad input through the CLI: exit code 2 and one ``structkd: error:`` line naming the file or
value, never a Python traceback (issue 10, items 6 and 7).

Each case runs ``structkd.cli.main`` in this interpreter (``cli_inprocess``; what a fresh
interpreter would print) and fails before any training, except the DataLoader-worker case,
whose error can only happen while images are loaded; that one and one other run as a real
``python -m structkd.cli`` process.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdtest import IMAGE_SIZE, NUM_CLASSES, cli_inprocess, tiny_overrides
from structkd.data import SyntheticPaths
from structkd.models import DetectorSpec, build_detector, export_student


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _fails(proc, *names: str) -> str:
    """Assert exit code 2, a single ``structkd: error:`` line naming each of ``names``, no
    traceback; return that line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("structkd: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert proc.stderr.count("structkd: error:") == 1
    for name in names:
        assert name in lines[0], lines[0]
    print(lines[0])  # shown by pytest -rP
    return lines[0]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny RetinaNet export (the runs' student architecture): its prefix."""
    spec = DetectorSpec(arch="retinanet", num_classes=NUM_CLASSES, backbone="resnet18",
                        fpn_channels=16, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)
    prefix = tmp_path_factory.mktemp("export") / "student"
    export_student(build_detector(spec), spec, prefix)
    return prefix


def _copy_export(export: Path, dest: Path, name: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(export.with_name(export.name + suffix), dest / (name + suffix))
    return dest / name


def _copy_data(coco_data: SyntheticPaths, dest: Path) -> SyntheticPaths:
    shutil.copytree(coco_data.root, dest)
    return SyntheticPaths.under(dest)


def _image_file(ann: Path, images: Path, index: int = 0) -> tuple[Path, dict]:
    record = json.loads(ann.read_text())["images"][index]
    return images / record["file_name"], record


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- teacher / eval


def test_truncated_safetensors_teacher(export, make_overrides, tmp_path: Path) -> None:
    teacher = _copy_export(export, tmp_path, "teacher")
    weights = teacher.with_name("teacher.safetensors")
    weights.write_bytes(weights.read_bytes()[:5000])
    proc = cli_inprocess(["distill", "--teacher", str(teacher),
                          *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, str(weights), "truncated or corrupt")


def test_garbage_safetensors_eval(export, make_overrides, tmp_path: Path) -> None:
    model = _copy_export(export, tmp_path, "model")
    weights = model.with_name("model.safetensors")
    weights.write_bytes(np.random.default_rng(0).bytes(3000))
    proc = cli_inprocess(["eval", str(weights), *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, str(weights), "not a readable .safetensors file")


def test_ckpt_that_is_not_a_structkd_checkpoint(make_overrides, tmp_path: Path) -> None:
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "epoch": 3}, ckpt)
    proc = cli_inprocess(["distill", "--teacher", str(ckpt),
                           *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, str(ckpt), "not a checkpoint of a structkd run")


def test_ckpt_that_is_not_a_checkpoint_at_all(make_overrides, tmp_path: Path) -> None:
    ckpt = tmp_path / "notes.ckpt"
    ckpt.write_text("hello\n")
    proc = cli_inprocess(["eval", str(ckpt), *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, str(ckpt), "not a readable PyTorch checkpoint")


def test_pth_given_as_teacher_checkpoint(make_overrides, tmp_path: Path) -> None:
    pth = tmp_path / "retinanet.pth"
    torch.save({}, pth)
    proc = cli_inprocess(["distill", "--teacher", str(pth),
                           *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, str(pth), "--teacher-weights")


def test_corrupt_teacher_json(export, make_overrides, tmp_path: Path) -> None:
    teacher = _copy_export(export, tmp_path, "teacher")
    doc = teacher.with_name("teacher.json")
    doc.write_text(doc.read_text()[:40])
    proc = cli_inprocess(["distill", "--teacher", str(teacher),
                           *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, str(doc), "not a readable JSON file")


def test_weights_that_do_not_match_the_architecture(export, make_overrides,
                                                    tmp_path: Path) -> None:
    """RetinaNet weights under a spec that says Faster R-CNN: the message says what each side
    looks like, not the hundreds of missing/unexpected keys."""
    teacher = _copy_export(export, tmp_path, "teacher")
    doc = teacher.with_name("teacher.json")
    document = json.loads(doc.read_text())
    document["spec"]["arch"] = "fasterrcnn"
    doc.write_text(json.dumps(document))
    proc = cli_inprocess(["distill", "--teacher", str(teacher),
                           *_sets(make_overrides(tmp_path / "run"))])
    line = _fails(proc, "teacher.safetensors", "look like RetinaNet, ResNet-18, FPN 16",
                  "is Faster R-CNN, ResNet-18, FPN 16")
    assert "Missing key" not in line and len(line) < 600


# ----------------------------------------------------------------------------- trainer settings


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_accelerator_gpu_without_gpu(make_overrides, tmp_path: Path) -> None:
    proc = cli_inprocess(["train", *_sets(make_overrides(tmp_path / "run",
                                                          "trainer.accelerator=gpu"))])
    _fails(proc, "trainer.accelerator='gpu'", "No supported gpu backend found")


def test_devices_not_a_number(make_overrides, tmp_path: Path) -> None:
    proc = cli_inprocess(["train", *_sets(make_overrides(tmp_path / "run",
                                                          "trainer.devices=abc"))])
    _fails(proc, "trainer.devices='abc'", "trainer.accelerator='cpu'")


# ----------------------------------------------------------------------------- output paths


def test_out_dir_is_an_existing_file(make_overrides, tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    proc = cli_inprocess(["train", *_sets(make_overrides(out))])
    _fails(proc, f"trainer.out_dir={str(out)!r}", "is an existing file")
    assert out.read_text() == "keep me\n"


def test_eval_out_is_a_directory_checked_before_evaluating(make_overrides,
                                                           tmp_path: Path) -> None:
    """The --out check comes first: the checkpoint (here missing) is not even opened."""
    (tmp_path / "metrics").mkdir()
    proc = cli_inprocess(["eval", str(tmp_path / "missing" / "student"), "--out",
                           str(tmp_path / "metrics"), *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, f"--out {tmp_path / 'metrics'} is a directory")


def _read_only_fs(monkeypatch) -> None:
    """Stand in for a read-only file system (these tests run as root, whom mode bits do not
    stop): the probe write fails as the kernel fails it."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)


@pytest.mark.parametrize("existing", [False, True])
def test_out_dir_on_a_read_only_file_system(make_overrides, tmp_path: Path, monkeypatch,
                                            existing: bool) -> None:
    out = tmp_path / "run"
    if existing:
        out.mkdir()
    _read_only_fs(monkeypatch)
    proc = cli_inprocess(["train", *_sets(make_overrides(out))])
    _fails(proc, f"trainer.out_dir={str(out)!r}", "Read-only file system")
    assert "data:" not in proc.stderr  # refused before the data was read


def test_eval_out_that_cannot_be_written_is_refused_before_evaluating(export, make_overrides,
                                                                      tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = cli_inprocess(["eval", str(export), "--out", str(blocker / "metrics.json"),
                          *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, f"--out {blocker / 'metrics.json'}: cannot write there ({blocker} is a file")
    assert "| " not in proc.stdout  # no evaluation ran


def test_eval_prints_the_metrics_before_writing_them(export, make_overrides, tmp_path: Path,
                                                     monkeypatch) -> None:
    """A write that fails at the end (a full disk) loses nothing: the table is printed first."""
    out = tmp_path / "metrics.json"
    original = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self == out:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    proc = cli_inprocess(["eval", str(export), "--out", str(out),
                          *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, f"--out {out}: cannot write the metrics (No space left on device)")
    assert "| model | AP | AP50 |" in proc.stdout and "per-class AP" in proc.stdout


def test_export_to_an_unwritable_path_is_refused_before_exporting(export, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = cli_inprocess(["export", str(export), "--onnx", str(blocker / "student.onnx")])
    _fails(proc, f"--onnx {blocker / 'student.onnx'}: cannot write there ({blocker} is a file")


@pytest.mark.parametrize("size", ["100000", "8"])
def test_export_size_outside_a_sane_range(export, tmp_path: Path, size: str) -> None:
    proc = cli_inprocess(["export", str(export), "--onnx", str(tmp_path / "s.onnx"),
                          "--size", size])
    _fails(proc, f"--size={size} is invalid; expected an int in [32, 8192]")
    assert not (tmp_path / "s.onnx").exists()


@pytest.mark.parametrize(("args", "names"), [
    (["--set", "distill.options.sigma=wide"],
     ["distill.options.sigma='wide'; expected float (distance 'ssim')"]),
    (["--set", "data.limit_train=0"], ["data.limit_train=0; expected an int >= 1"]),
    (["--set", "optim.grad_clip=-1"], ["optim.grad_clip=-1.0; expected a finite number > 0"]),
    (["--teacher", "retinanet_resnet50_fpn_v3"],
     ["--teacher: 'retinanet_resnet50_fpn_v3' is not a detector structkd can make",
      "did you mean 'retinanet_resnet50_fpn_v2'"]),
    (["--set", "teacher.torchvision=fcos_resnet_50_fpn"],
     ["teacher.torchvision='fcos_resnet_50_fpn' is not a torchvision detection builder",
      "did you mean 'fcos_resnet50_fpn'"]),
])
def test_config_errors_before_any_work(args: list[str], names: list[str], make_overrides,
                                       tmp_path: Path) -> None:
    proc = cli_inprocess(["distill", *args, *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, *names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("source", "names"), [
    ("import sys\nx = (\n", ["importing 'kd_broken_module' failed: SyntaxError", "line 2"]),
    ("raise RuntimeError('boom at import')\n",
     ["importing 'kd_broken_module' failed: RuntimeError: boom at import"]),
])
def test_a_distill_imports_module_that_fails(source: str, names: list[str], tmp_path: Path,
                                             monkeypatch) -> None:
    (tmp_path / "kd_broken_module.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "kd_broken_module", raising=False)
    proc = cli_inprocess(["config", "--set", "distill.imports=[kd_broken_module]"])
    _fails(proc, "distill.imports:", *names)


# ----------------------------------------------------------------------------- images


def test_missing_val_image_found_at_start(coco_data, tmp_path: Path) -> None:
    """Found while loading the data, before any training: no run directory is created."""
    data = _copy_data(coco_data, tmp_path / "data")
    path, record = _image_file(data.val_ann, data.val_images, 1)
    path.unlink()
    out = tmp_path / "run"
    proc = cli_inprocess(["train", *_sets(tiny_overrides(data, out))])
    _fails(proc, str(data.val_ann), "1 of 4 image files", f"image id {record['id']}",
           str(path), "does not exist")
    assert not out.exists()


def test_decompression_bomb_image(coco_data, tmp_path: Path) -> None:
    data = _copy_data(coco_data, tmp_path / "data")
    coco = json.loads(data.train_ann.read_text())
    coco["images"][0].update(width=20000, height=20000)
    data.train_ann.write_text(json.dumps(coco))
    path = data.train_images / coco["images"][0]["file_name"]
    path.write_bytes(png_header_only(20000, 20000))
    proc = cli_inprocess(["train", *_sets(tiny_overrides(data, tmp_path / "run"))])
    _fails(proc, str(path), "decompression bomb", "STRUCTKD_MAX_IMAGE_PIXELS=")


def test_dataloader_worker_error_is_one_line(coco_data, tmp_path: Path) -> None:
    """Pixel data cut short after a valid header passes the start-up check (headers only) and
    fails in a loader worker; the user sees the worker's one-line message, not its traceback."""
    data = _copy_data(coco_data, tmp_path / "data")
    path, _ = _image_file(data.train_ann, data.train_images, 2)
    noise = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:4000])
    proc = cli_inprocess(["train", *_sets(tiny_overrides(data, tmp_path / "run",
                                                          "data.num_workers=1"))])
    line = _fails(proc, str(path), "is corrupt or not an image")
    assert "DataLoader worker" not in line


def test_teacher_flag_names_a_family_for_its_own_saves(tmp_path: Path) -> None:
    """--teacher: an Ultralytics .pt and a save_pretrained folder become teacher.family +
    teacher.name; a .pt holding a plain state dict stays a checkpoint (and gets the
    --teacher-weights hint); a structkd run folder stays a checkpoint."""
    from structkd.recipes import teacher_fields

    def overrides(name: str) -> list[str]:
        return [f"teacher.{k}={v}" for k, v in teacher_fields(name).items()]

    state = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, state)
    assert overrides(str(state)) == [f"teacher.checkpoint={state}"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "student.json").write_text("{}")
    (run / "config.json").write_text("{}")
    assert overrides(str(run)) == [f"teacher.checkpoint={run}"]
    pytest.importorskip("transformers")
    from structkd.detectors.transformers_build import transformers_detector

    folder = transformers_detector("rt_detr", 3, num_queries=20).save_native(tmp_path / "hf")
    assert overrides(str(folder)) == ["teacher.family=transformers", f"teacher.name={folder}"]
    pytest.importorskip("ultralytics")
    from structkd.detectors.ultralytics_build import yolo_detector

    pt = yolo_detector("yolov8n.yaml", 3).save_native(tmp_path / "yolo")
    assert overrides(str(pt)) == ["teacher.family=ultralytics", f"teacher.name={pt}"]


# ------------------------------------------------------------- issue 24, items 8 and 9


def test_a_truncated_pt_teacher_is_named_as_such(tmp_path: Path, make_overrides) -> None:
    """A cut ``.pt`` (an Ultralytics checkpoint or a state dict: both zip archives) is not
    described as a torchvision or structkd file."""
    pt = tmp_path / "yolo11s.pt"
    torch.save({"model": torch.zeros(1000)}, pt)
    pt.write_bytes(pt.read_bytes()[:300])
    proc = cli_inprocess(["distill", "--teacher", str(pt),
                          *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, f"--teacher: {pt}: not a readable PyTorch checkpoint", "truncated or corrupt")


def test_a_lock_that_is_a_folder(make_overrides, tmp_path: Path) -> None:
    (tmp_path / "run" / ".structkd.lock").mkdir(parents=True)
    proc = cli_inprocess(["train", *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, str(tmp_path / "run" / ".structkd.lock"), "is a folder", "remove it")


def test_a_full_disk_is_one_line(make_overrides, tmp_path: Path, monkeypatch) -> None:
    """No space left while the run writes its checkpoint: one line naming the file and what to
    do, not a traceback."""
    import errno

    import lightning.pytorch.callbacks.model_checkpoint as mc

    def full(self, trainer, filepath):
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(mc.ModelCheckpoint, "_save_checkpoint", full)
    proc = cli_inprocess(["train", *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, "last.ckpt: No space left on device (ENOSPC); free some space and resume")


def test_compare_out_on_a_file(make_overrides, tmp_path: Path, export: Path) -> None:
    out = tmp_path / "results"
    out.write_text("a file the user keeps")
    proc = cli_inprocess(["compare", "--teacher", str(export), "--seeds", "1", "--out",
                          str(out), *_sets(make_overrides(tmp_path / "run"))])
    _fails(proc, f"out='{out}' is an existing file; expected a folder")
    assert out.read_text() == "a file the user keeps"
