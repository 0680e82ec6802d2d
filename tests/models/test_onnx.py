"""ONNX export of students: parity with PyTorch in ONNX Runtime, label map, refusals, latency."""

from __future__ import annotations

import json
import types

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from structkd.distill import Distiller
from structkd.models import build_detector, export_student
from structkd.models.onnx import (
    ONNX_FORMAT,
    OnnxDetector,
    export_onnx,
    export_run,
    onnx_latency,
    onnx_runner,
    read_onnx_metadata,
)

SIZE = 128
CLASS_NAMES = ["__background__", "circle", "square", "triangle"]
LABEL_TO_CAT_ID = {"1": 11, "2": 22, "3": 33}


def _detector(arch: str, **kw) -> nn.Module:
    """A tiny detector with random weights, a low score threshold and well spread scores.

    Freshly initialised heads give nearly equal scores (RetinaNet: all ~0.01), so which of
    the tied candidates survive top-k/NMS would hinge on float rounding; the classifier is
    rescaled so its logits spread (std 1.5 around -2) and the comparison means something.
    """
    torch.manual_seed(0)
    extra = {} if arch == "fcos" else {"anchor_size": 16}
    model = build_detector(arch=arch, num_classes=len(CLASS_NAMES), backbone="resnet18",
                           fpn_channels=16, min_size=SIZE, max_size=SIZE, score_thresh=0.01,
                           **extra, **kw).eval()
    with torch.no_grad():
        if arch == "fasterrcnn":
            nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
            return model
        cls = model.head.classification_head.cls_logits
        outs: list[torch.Tensor] = []
        hook = cls.register_forward_hook(lambda m, i, o: outs.append(o))
        model(_images(n=1))
        hook.remove()
        logits = torch.cat([o.flatten() for o in outs])
        scale = 1.5 / float(logits.std())
        cls.weight.mul_(scale)
        cls.bias.copy_(-2.0 - scale * (float(logits.mean()) - cls.bias))
    return model


def _images(h: int = SIZE, w: int = SIZE, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, h, w, generator=g) for _ in range(n)]


def _assert_same_detections(ref: dict, got: dict) -> tuple[float, float]:
    """Same count; scores equal once sorted (atol 1e-4); every ONNX detection has a PyTorch one
    with the same label, score (1e-4) and box (1e-3 px). Returns the max (box, score) gaps."""
    rb, rs, rl = (ref[k].numpy() for k in ("boxes", "scores", "labels"))
    gb, gs, gl = (got[k].numpy() for k in ("boxes", "scores", "labels"))
    assert len(rb) == len(gb) > 0
    assert gl.dtype == np.int64 and gb.shape == (len(gb), 4)
    score_gap = float(np.abs(np.sort(rs)[::-1] - np.sort(gs)[::-1]).max())
    assert score_gap < 1e-4
    box_gap = 0.0
    for box, score, label in zip(gb, gs, gl, strict=True):
        same = (rl == label) & (np.abs(rs - score) < 1e-4)
        assert same.any(), f"no PyTorch detection with label {label} and score {score}"
        box_gap = max(box_gap, float(np.abs(rb[same] - box).max(axis=1).min()))
    assert box_gap < 1e-3
    return box_gap, score_gap


@pytest.fixture(scope="module")
def run_export(tmp_path_factory) -> tuple[nn.Module, object, dict]:
    """A RetinaNet student exported like a run (RUN/student.*), then to ONNX by export_run."""
    run = tmp_path_factory.mktemp("run")
    model = _detector("retinanet")
    export_student(model, model.structkd_spec, run / "student",
                   extra_meta={"class_names": CLASS_NAMES, "label_to_cat_id": LABEL_TO_CAT_ID})
    path = export_run(run, run / "student.onnx")
    return model, path, json.loads((run / "student.json").read_text())


def test_export_run_matches_pytorch_and_keeps_the_label_map(run_export) -> None:
    model, path, student_json = run_export
    onnx.checker.check_model(str(path))
    meta = read_onnx_metadata(path)
    assert meta == json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["format"] == ONNX_FORMAT and meta["arch"] == "retinanet"
    assert meta["class_names"] == student_json["meta"]["class_names"] == CLASS_NAMES
    assert meta["label_to_cat_id"] == student_json["meta"]["label_to_cat_id"]
    assert meta["spec"] == student_json["spec"]
    assert meta["input"]["shape"] == [3, SIZE, SIZE]  # the spec's min_size by default
    detector = OnnxDetector(path)
    assert detector.label_map() == {1: (11, "circle"), 2: (22, "square"), 3: (33, "triangle")}
    images = _images()
    with torch.no_grad():
        refs = model(images)
    outs = detector(torch.stack(images))  # a batch runs image by image
    assert len(outs) == 2
    for ref, got in zip(refs, outs, strict=True):
        _assert_same_detections(ref, got)


@pytest.mark.parametrize(("arch", "dynamic"), [("fcos", True), ("fasterrcnn", False)])
def test_export_matches_pytorch(arch: str, dynamic: bool, tmp_path) -> None:
    model = _detector(arch)
    path = export_onnx(model, tmp_path / f"{arch}.onnx", image_size=SIZE, dynamic=dynamic,
                       meta={"class_names": CLASS_NAMES, "label_to_cat_id": LABEL_TO_CAT_ID})
    assert not model.training  # mode restored
    detector = OnnxDetector(path)
    assert detector.metadata["arch"] == arch
    assert detector.metadata["input"]["dynamic"] is dynamic
    images = _images()
    if dynamic:  # symbolic height/width: other sizes run too, through the same resize
        images += _images(96, 160, n=1) + _images(150, 100, n=1)
    for image in images:
        with torch.no_grad():
            ref = model([image])[0]
        _assert_same_detections(ref, detector(image)[0])


def test_fixed_size_refuses_other_sizes(run_export) -> None:
    with pytest.raises(ValueError, match="fixed"):
        OnnxDetector(run_export[1])(_images(96, 96, n=1))
    with pytest.raises(ValueError, match="fixed"):
        onnx_runner(run_export[1], 96)


def test_refuses_distiller_teacher_and_adapters(tmp_path) -> None:
    student = build_detector(arch="retinanet", num_classes=3, backbone="resnet18",
                             fpn_channels=16, min_size=64, max_size=64)
    teacher = build_detector(arch="retinanet", num_classes=3, backbone="resnet18",
                             fpn_channels=32, min_size=64, max_size=64)
    distiller = Distiller(student, teacher, "l1")
    with pytest.raises(ValueError, match=r"distillation wrapper.*student"):
        export_onnx(distiller, tmp_path / "d.onnx")
    with_teacher = build_detector(student.structkd_spec)
    with_teacher.teacher = teacher
    with pytest.raises(ValueError, match="teacher"):
        export_onnx(with_teacher, tmp_path / "t.onnx")
    with_adapter = build_detector(student.structkd_spec)
    with_adapter.adapter = nn.Conv2d(16, 32, 1)
    with pytest.raises(ValueError, match="adapters"):
        export_onnx(with_adapter, tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="cannot be exported"):
        export_onnx(nn.Linear(2, 2), tmp_path / "l.onnx")
    assert not list(tmp_path.iterdir())  # nothing written


def test_onnx_latency_is_positive(run_export) -> None:
    ms = onnx_latency(run_export[1], warmup=1, iters=3)
    assert isinstance(ms, float) and ms > 0
    boxes, scores, labels = onnx_runner(run_export[1])()
    assert boxes.shape == (len(scores), 4) and len(labels) == len(scores) > 0
    with pytest.raises(ValueError, match="iters"):
        onnx_latency(run_export[1], iters=0)


def test_onnx_latency_times_warmup_and_iters_calls(monkeypatch, tmp_path) -> None:
    """onnx_latency is the median of ``iters`` timed calls after ``warmup`` untimed ones of the
    runner onnx_runner builds (stood in for here: no export, a fake clock)."""
    from structkd import timing
    from structkd.models.onnx import runtime

    clock = [0.0]
    durations = iter([50.0, 50.0, 7.0, 3.0, 5.0])  # two warm-up calls, then three timed ones
    built = []

    def fake_runner(path, image_size=None, *, seed=0, threads=None):
        built.append((path, image_size, threads))

        def run() -> None:
            clock[0] += next(durations) / 1000.0

        return run

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(runtime, "onnx_runner", fake_runner)
    ms = onnx_latency(tmp_path / "m.onnx", 96, warmup=2, iters=3, threads=1)
    assert ms == pytest.approx(5.0)
    assert built == [(tmp_path / "m.onnx", 96, 1)]
    assert next(durations, None) is None  # exactly warmup + iters calls
    with pytest.raises(ValueError, match="warmup=-1"):
        onnx_latency(tmp_path / "m.onnx", warmup=-1)


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    """No space left while the ONNX file is written: one ValueError naming the path, no
    truncated file at the path (an earlier export there stays as it was), no temporary left."""
    import errno

    model = _detector("fcos")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an earlier export")

    def full_disk(proto, where, *args, **kwargs):
        with open(where, "wb") as f:
            f.write(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", full_disk)
    with pytest.raises(ValueError, match=r"--onnx .*model\.onnx: cannot write the ONNX file "
                                         r"\(No space left on device\); no partial file"):
        export_onnx(model, path, image_size=SIZE)
    assert path.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
