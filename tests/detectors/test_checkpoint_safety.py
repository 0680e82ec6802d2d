"""Loading a checkpoint never runs code from it.

A payload ``.pt`` (its pickle calls ``os.system("touch MARK")`` when unpickled, and names
``ultralytics.nn`` so that the CLI takes it for an Ultralytics checkpoint) is given to every path
that reads one: the CLI teacher, a config teacher, a student, the Python builder, the Ultralytics
trainer integration (teacher and ``resume=``), ``cache-teacher`` and an export whose native save
was replaced. Each is refused with one line naming the global the file would import, and the
marker file is never created (the independent check: the payload's own side effect).

Genuine checkpoints written by Ultralytics' trainer (YOLOv8, YOLO11, YOLO26, RT-DETR; ``last.pt``
during training, with EMA and optimizer state, and after it, stripped) load to exactly the
weights Ultralytics' own unrestricted loader gives.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from kdtest import IMAGE_SIZE, NUM_CLASSES, cli_inprocess, tiny_overrides
from structkd.data import SyntheticPaths

os.environ.setdefault("YOLO_OFFLINE", "1")
ultralytics = pytest.importorskip("ultralytics")

from structkd.detectors.ultralytics_build import load_checkpoint, yolo_detector  # noqa: E402

REFUSED = "outside the classes a genuine Ultralytics checkpoint holds"


class _Payload:
    """Unpickling an instance runs ``touch mark``."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.mark}",))


def _payload(path: Path) -> Path:
    """A ``.pt`` at ``path`` that creates ``path.mark`` when unpickled; returns the mark."""
    mark = path.with_suffix(".mark")
    torch.save({"model": _Payload(mark), "note": "ultralytics.nn.tasks.DetectionModel",
                "train_args": {}}, path)
    return mark


@pytest.fixture(autouse=True)
def _ultralytics_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics"))


def _tiny_rtdetr_yaml(folder: Path) -> Path:
    """Ultralytics' rtdetr-l.yaml at a quarter of its width with a 2-layer, 64-wide decoder (a
    genuine RT-DETR that trains in seconds)."""
    from ultralytics.utils import ROOT

    text = (ROOT / "cfg" / "models" / "rt-detr" / "rtdetr-l.yaml").read_text()
    for old, new in (("l: [1.00, 1.00, 1024]", "n: [0.33, 0.25, 256]"),
                     ("AIFI, [1024, 8]", "AIFI, [128, 4]"),
                     ("RTDETRDecoder, [nc]", "RTDETRDecoder, [nc, 64, 100, 4, 4, 2, 128]")):
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "rtdetr-tiny.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def genuine(coco_data: SyntheticPaths, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, dict[str, Path]]:
    """Per family, ``last.pt`` as Ultralytics' trainer writes it during training ("full": EMA
    + optimizer state, no plain model) and after it ("stripped": the EMA as the model, no
    optimizer, fp16), from one tiny epoch each."""
    root = tmp_path_factory.mktemp("genuine")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("YOLO_CONFIG_DIR", str(root / "ultralytics"))
        return _train_genuine(coco_data, root)


def _train_genuine(coco_data: SyntheticPaths, root: Path) -> dict[str, dict[str, Path]]:
    from ultralytics import RTDETR, YOLO

    from structkd.data.yolo_format import to_yolo

    data = to_yolo(coco_data.train_ann, coco_data.train_images, coco_data.val_ann,
                   coco_data.val_images, root / "data")
    out: dict[str, dict[str, Path]] = {}
    for name, cfg in (("yolov8", "yolov8n.yaml"), ("yolo11", "yolo11n.yaml"),
                      ("yolo26", "yolo26n.yaml"), ("rtdetr", str(_tiny_rtdetr_yaml(root)))):
        model = (RTDETR if name == "rtdetr" else YOLO)(cfg)
        weights = root / name / "weights"

        def keep(trainer: Any, weights: Path = weights) -> None:
            shutil.copy(trainer.last, weights / "full.pt")

        model.add_callback("on_model_save", keep)
        model.train(data=str(data), epochs=1, imgsz=IMAGE_SIZE, batch=4, workers=0,
                    device="cpu", project=str(root), name=name, exist_ok=True, plots=False,
                    amp=False, seed=0, verbose=False, val=False)
        out[name] = {"full": weights / "full.pt", "stripped": weights / "last.pt"}
    return out


@pytest.mark.parametrize("variant", ["full", "stripped"])
@pytest.mark.parametrize("family", ["yolov8", "yolo11", "yolo26", "rtdetr"])
def test_genuine_checkpoints_load_to_ultralytics_own_weights(genuine, family: str,
                                                             variant: str) -> None:
    from ultralytics.nn.tasks import load_checkpoint as ultralytics_load

    path = genuine[family][variant]
    ours, ckpt = load_checkpoint(path)
    theirs, _ = ultralytics_load(str(path))  # Ultralytics' unrestricted loader
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ours.args == theirs.args and ours.args["epochs"] == 1  # train_args applied
    if variant == "full":  # the EMA is the model; the optimizer state is there
        assert ckpt["model"] is None and ckpt["ema"] is not None and ckpt["optimizer"]
    else:
        assert ckpt["ema"] is None and ckpt["optimizer"] is None and ckpt["model"] is not None
    built = yolo_detector(path, NUM_CLASSES)  # the builder: same weights, class head kept
    assert built.num_classes == NUM_CLASSES
    own = built.model.state_dict()
    assert all(torch.equal(own[k].float(), b[k].float()) for k in b)


def test_python_builder_refuses_a_payload(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    mark = _payload(path)
    with pytest.raises(ValueError, match=REFUSED) as error:
        yolo_detector(path, NUM_CLASSES)
    assert "posix.system" in str(error.value) and "\n" not in str(error.value)
    assert "trust_checkpoint" in str(error.value)
    assert not mark.exists()


def test_trust_checkpoint_is_the_opt_in_and_is_logged(tmp_path: Path, genuine,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = genuine["yolo11"]["stripped"]
    with caplog.at_level(logging.WARNING, "structkd"):
        trusted, _ = load_checkpoint(path, trust_checkpoint=True)
    assert any("trust_checkpoint=True" in r.message and str(path) in r.message
               for r in caplog.records)
    safe, _ = load_checkpoint(path)
    assert all(torch.equal(v, safe.state_dict()[k]) for k, v in trusted.state_dict().items())
    payload = tmp_path / "x.pt"
    mark = _payload(payload)
    with pytest.raises(ValueError, match="not an Ultralytics checkpoint"):
        load_checkpoint(payload, trust_checkpoint=True)  # unrestricted: the payload ran
    assert mark.exists()


def test_a_damaged_checkpoint_is_one_line(tmp_path: Path, genuine) -> None:
    cut = tmp_path / "cut.pt"
    data = genuine["yolov8"]["stripped"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable Ultralytics checkpoint") as error:
        load_checkpoint(cut)
    assert "\n" not in str(error.value)


def _cli(coco_data: SyntheticPaths, out: Path, *args: str) -> Any:
    """``structkd ARGS`` on a tiny run; ``--set`` values in ``args`` join the tiny ones."""
    sets = [a for i, a in enumerate(args) if i and args[i - 1] == "--set"]
    rest = [a for i, a in enumerate(args) if a != "--set" and not (i and args[i - 1] == "--set")]
    overrides = tiny_overrides(coco_data, out, "schedule.max_steps=1", *sets)
    return cli_inprocess([rest[0], *[a for o in overrides for a in ("--set", o)], *rest[1:]])


@pytest.mark.parametrize("case", ["cli_teacher", "config_teacher", "student", "cache_teacher"])
def test_cli_paths_refuse_a_payload(coco_data: SyntheticPaths, tmp_path: Path, case: str) -> None:
    path = tmp_path / "payload.pt"
    mark = _payload(path)
    args = {
        "cli_teacher": ["distill", "--teacher", str(path)],
        "config_teacher": ["distill", "--set", "teacher.family=ultralytics",
                           "--set", f"teacher.name={path}"],
        "student": ["train", "--set", "model.family=ultralytics", "--set",
                    f"model.name={path}"],
        "cache_teacher": ["cache-teacher", "--teacher", str(path), "--out",
                          str(tmp_path / "cache")],
    }[case]
    r = _cli(coco_data, tmp_path / "run", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert REFUSED in r.stderr and "posix.system" in r.stderr and "--trust-checkpoint" in r.stderr
    assert not mark.exists()
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_trust_checkpoint_flag_needs_a_family_detector(coco_data: SyntheticPaths,
                                                       tmp_path: Path) -> None:
    r = _cli(coco_data, tmp_path / "run", "train", "--trust-checkpoint")
    assert r.returncode == 2
    assert "--trust-checkpoint applies to a model or teacher of another family" in r.stderr


def test_trust_checkpoint_flag_reaches_the_builder(coco_data: SyntheticPaths,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "payload.pt"
    mark = _payload(path)
    r = _cli(coco_data, tmp_path / "run", "distill", "--teacher", str(path),
             "--trust-checkpoint")
    assert mark.exists()  # vouched for: loaded by Ultralytics' own unpickler
    assert r.returncode == 2 and "not an Ultralytics checkpoint" in r.stderr


def test_export_with_a_payload_as_its_native_save(tmp_path: Path) -> None:
    """An export whose ``rebuild`` is edited to null and whose native ``.pt`` is replaced is
    refused by ``load_detector`` (what ``structkd eval`` / ``export`` read); and an export
    cannot vouch for its own files."""
    from structkd.models import export_student
    from structkd.models.load import load_detector

    student = yolo_detector("yolov8n.yaml", NUM_CLASSES, min_size=IMAGE_SIZE,
                            max_size=IMAGE_SIZE)
    native = student.save_native(tmp_path / "student_native")
    family = {"adapter": student.adapter, "native": native.name, "rebuild": None,
              "num_classes": student.num_classes, "options": student.options()}
    export_student(student, None, tmp_path / "student", extra_meta={"family": family})
    rebuilt, _ = load_detector(tmp_path / "student")  # the genuine native save loads
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in student.state_dict().items())
    mark = _payload(native)
    with pytest.raises(ValueError, match=REFUSED):
        load_detector(tmp_path / "student")
    assert not mark.exists()
    document = json.loads((tmp_path / "student.json").read_text())
    document["meta"]["family"]["options"]["trust_checkpoint"] = True
    (tmp_path / "student.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="an export cannot vouch for its own files"):
        load_detector(tmp_path / "student")
    assert not mark.exists()


def test_integration_refuses_a_payload_teacher_and_resume(tmp_path: Path, genuine) -> None:
    from structkd.integrations.ultralytics import distill_trainer, load_teacher

    path = tmp_path / "teacher.pt"
    mark = _payload(path)
    for call in (lambda: distill_trainer(path, "mse"), lambda: load_teacher(path)):
        with pytest.raises(ValueError, match=REFUSED):
            call()
        assert not mark.exists()
    trainer = distill_trainer(genuine["yolo11"]["stripped"], "mse")
    with pytest.raises(ValueError, match=REFUSED):
        trainer(overrides={"model": "yolov8n.yaml", "resume": str(path), "device": "cpu"})
    assert not mark.exists()
    # Ultralytics' own loads while the trainer runs (resume=True finding a last.pt, NaN
    # recovery, the final validation) are restricted to its allowlist too
    from ultralytics.nn import tasks

    from structkd.integrations.ultralytics import restricted_loads

    with restricted_loads(), pytest.raises(TypeError, match="outside the supported"):
        tasks.load_checkpoint(str(path))
    assert not mark.exists() and not tasks.SAFE_LOAD  # switched back afterwards


def test_transformers_folder_with_a_pickled_payload_runs_nothing(tmp_path: Path) -> None:
    """A ``save_pretrained`` folder whose weights are a pickled ``pytorch_model.bin`` payload:
    transformers reads it with ``weights_only=True``, so it is refused and nothing runs."""
    pytest.importorskip("transformers")
    from structkd.detectors.transformers_build import transformers_detector

    det = transformers_detector("rt_detr", NUM_CLASSES)
    folder = tmp_path / "rtdetr"
    det.save_native(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    mark = _payload(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a loadable save_pretrained folder") as error:
        transformers_detector(str(folder), NUM_CLASSES)
    assert "Weights only load failed" in str(error.value) and "\n" not in str(error.value)
    assert not mark.exists()
