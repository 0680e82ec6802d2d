"""The Ultralytics adapter: losses, predictions and checkpoints against Ultralytics' own code
paths on the same batch, default taps (strides 8/16/32), and distillation with any family."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no online checks
pytest.importorskip("ultralytics")

from kdtest import assert_same_detections
from structkd.detectors import as_detector, detector_family
from structkd.detectors.ultralytics import (
    UltralyticsDetector,
    is_ultralytics_detector,
)
from structkd.detectors.ultralytics_build import yolo_detector
from structkd.distill import Distiller, FeatureTap, measure_levels

K = 3  # object classes; structkd's num_classes = K + 1
H, W = 64, 96  # every test image: a batch of these is neither resized nor padded
YOLOS = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]


def _images(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # uint8 values / 255: what Ultralytics' predictor makes of an 8-bit image
    return [torch.randint(0, 256, (3, H, W), generator=g).float() / 255 for _ in range(n)]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0]]),
         "labels": torch.tensor([1, 3]), "image_id": torch.tensor(7)},
        {"boxes": torch.tensor([[20.0, 8.0, 60.0, 60.0]]), "labels": torch.tensor([2]),
         "image_id": torch.tensor(8)},
    ]


def _build(name: str, **options) -> UltralyticsDetector:
    torch.manual_seed(0)
    det = yolo_detector(name, K + 1, min_size=H, max_size=W, **options)
    head = det.model.model[-1]
    for branch in ("cv3", "one2one_cv3"):  # spread the class scores over (0, 1): no near-ties
        for seq in getattr(head, branch, None) or []:
            nn.init.normal_(seq[-1].bias, 0.0, 2.0)
    return det


@pytest.fixture(scope="module")
def yolos() -> dict[str, UltralyticsDetector]:
    return {name: _build(name) for name in YOLOS}


def _reference_batch(targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Ultralytics' batch dict built by hand: class 0..K-1, normalised (cx, cy, w, h)."""
    rows = []
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), label in zip(t["boxes"].numpy(), t["labels"].numpy(), strict=True):
            rows.append([i, label - 1, (x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W,
                         (y2 - y1) / H])
    a = np.asarray(rows, dtype=np.float32)
    return {"batch_idx": torch.from_numpy(a[:, 0]), "cls": torch.from_numpy(a[:, 1:2]),
            "bboxes": torch.from_numpy(a[:, 2:])}


@pytest.mark.parametrize("name", YOLOS)
def test_builds_with_default_taps_at_strides_8_16_32(yolos, name: str) -> None:
    det = yolos[name]
    head = det.model.model[-1]
    assert det.family == "yolo" and det.root == "model" and det.num_labels == K
    assert det.taps == [f"model.model.{i}" for i in head.f]
    assert det.transform.size_divisible == 32
    tap = FeatureTap(det, det.taps)
    try:
        levels = measure_levels(det, tap, det.root)
    finally:
        tap.close()
    assert [v.stride for v in levels.values()] == [8, 16, 32]
    assert det.training  # the dry run left the mode alone


@pytest.mark.parametrize("name", YOLOS)
def test_losses_equal_ultralytics_loss_on_the_same_batch(yolos, name: str) -> None:
    det = yolos[name].train()
    images, targets = _images(), _targets()
    det.zero_grad()
    det.loss_reduction = "sum"  # what Ultralytics' trainer back-propagates
    try:
        losses = det(images, targets)
    finally:
        det.loss_reduction = "mean"
    expected_names = {"box", "cls", "l1" if name.startswith("yolo26") else "dfl"}
    assert set(losses) == expected_names
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    total = sum(losses.values())
    total.backward()
    trainable = [p for p in det.parameters() if p.requires_grad]
    with_grad = [p for p in trainable if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > 0.9 * len(trainable)

    with torch.no_grad():  # Ultralytics' own loss on the hand-made batch, as its trainer calls it
        batch = {"img": torch.stack(images), **_reference_batch(targets)}
        ref, items = det.model.loss(batch)
    assert ref.shape == (3,)
    torch.testing.assert_close(total.detach(), ref.sum(), rtol=1e-4, atol=1e-4)
    got = torch.stack([losses[str(k).removesuffix("_loss")] for k in items]).detach()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_mean_reduction_divides_by_the_batch_size(yolos) -> None:
    det = yolos["yolov8n.yaml"].train()
    assert det.loss_reduction == "mean"  # the default: per image, as torchvision's losses
    mean = det(_images(), _targets())
    det.loss_reduction = "sum"
    try:
        summed = det(_images(), _targets())
    finally:
        det.loss_reduction = "mean"
    for k in summed:
        torch.testing.assert_close(mean[k].detach() * 2, summed[k].detach(), rtol=1e-4,
                                   atol=1e-5)


def test_label_outside_the_classes_names_label_and_image(yolos) -> None:
    det = yolos["yolov8n.yaml"].train()
    targets = _targets()
    targets[1]["labels"] = torch.tensor([K + 1])
    with pytest.raises(ValueError, match=rf"label {K + 1} of image 8 is outside 1..{K}"):
        det(_images(), targets)
    targets[1]["labels"] = torch.tensor([0])  # background is no class either
    with pytest.raises(ValueError, match="label 0 of image"):
        det(_images(), targets)


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolo26n.yaml"])
def test_predictions_equal_ultralytics_forward_and_nms(yolos, name: str) -> None:
    from ultralytics.utils.nms import non_max_suppression

    det = yolos[name].eval()
    images = _images(seed=1)
    with torch.no_grad():
        out = det(images)
        raw = det.model(torch.stack(images))
        ref = non_max_suppression(raw, 0.001, 0.7, max_det=100)
    assert len(out) == 2
    for o, r in zip(out, ref, strict=True):
        assert 0 < len(r) <= 100 and o["boxes"].shape == (len(r), 4)
        r[:, [0, 2]] = r[:, [0, 2]].clamp(0, W)
        r[:, [1, 3]] = r[:, [1, 3]].clamp(0, H)
        torch.testing.assert_close(o["boxes"], r[:, :4], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(o["scores"], r[:, 4], rtol=1e-4, atol=1e-5)
        assert torch.equal(o["labels"], r[:, 5].long() + 1)
        assert o["labels"].min() >= 1 and o["labels"].max() <= K


@pytest.mark.parametrize(("name", "end2end"), [("yolov8n.yaml", False), ("yolo26n.yaml", False),
                                             ("yolo26n.yaml", True)])
def test_onnx_export_matches_ultralytics_nms(name: str, end2end: bool, tmp_path: Path) -> None:
    """The exported graph (resize, model, a traceable form of Ultralytics' NMS selection, the
    resize back) gives in ONNX Runtime the detections PyTorch gets with Ultralytics' own
    ``non_max_suppression`` (or, NMS-free, the one-to-one head's top-k)."""
    from structkd.models.onnx import OnnxDetector, export_onnx, read_onnx_metadata

    det = _build(name, conf_thresh=0.25, detections_per_img=300)
    # Input-dependent outputs, not a random net's constant ones: perturbed weights and batch
    # statistics measured on images; the fixed seeds keep every selection clear of its
    # boundaries (score threshold, NMS IoU, top-k), where two runtimes may differ in float noise.
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in det.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        det.model.train()
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            det.model(torch.rand(4, 3, H, W, generator=g))
    det.eval()
    det.model.end2end = end2end
    path = export_onnx(det, tmp_path / "s.onnx", image_size=(H, W))
    assert read_onnx_metadata(path)["arch"] == "ultralytics:DetectionModel"
    onnx_det = OnnxDetector(path)
    for image in _images(seed=2):
        with torch.no_grad():
            ref = det([image])[0]
        got = onnx_det([image])[0]
        assert 10 <= len(ref["scores"]) < 300
        assert_same_detections(ref, got, box_atol=1e-2, score_atol=1e-4)


def test_predictions_are_in_the_original_images_pixels(yolos) -> None:
    det = yolos["yolov8n.yaml"].eval()
    big = [torch.nn.functional.interpolate(img[None], scale_factor=2.0)[0] for img in _images()]
    with torch.no_grad():
        small, large = det(_images()), det(big)  # big: resized to H x W inside, mapped back
    for s, lg in zip(small, large, strict=True):
        assert lg["boxes"][:, [0, 2]].max() <= 2 * W and lg["boxes"][:, [1, 3]].max() <= 2 * H
        assert lg["boxes"].max() > max(H, W)  # not left in the resized image's pixels
        # the best detection of the upsampled image sits where the original's does, twice as far
        torch.testing.assert_close(lg["boxes"][0], 2 * s["boxes"][0], rtol=0.1, atol=4.0)


def test_save_native_loads_in_ultralytics_and_predicts_the_same(yolos, tmp_path: Path) -> None:
    from ultralytics import YOLO

    det = yolos["yolo11n.yaml"].eval()
    path = det.save_native(tmp_path / "student")
    assert path == tmp_path / "student.pt" and path.is_file()
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert {"model", "train_args", "version"} <= set(ckpt)
    yolo = YOLO(str(path))
    assert yolo.task == "detect"
    image = _images(1, seed=2)[0]
    bgr = (image * 255).round().byte().permute(1, 2, 0).numpy()[..., ::-1].copy()
    res = yolo.predict(bgr, imgsz=(H, W), conf=0.001, iou=0.7, max_det=100, verbose=False)[0]
    with torch.no_grad():
        mine = det([image])[0]
    assert res.orig_shape == (H, W) and len(res.boxes) == len(mine["boxes"]) > 0
    top = min(10, len(mine["boxes"]))  # Ultralytics predicts with BatchNorm folded: near-equal
    torch.testing.assert_close(res.boxes.xyxy[:top].float(), mine["boxes"][:top], rtol=1e-3,
                               atol=1e-2)
    torch.testing.assert_close(res.boxes.conf[:top].float(), mine["scores"][:top], rtol=1e-3,
                               atol=1e-4)
    assert torch.equal(res.boxes.cls[:top].long() + 1, mine["labels"][:top])

    back = yolo_detector(path, K + 1)  # structkd's builder reads it back, the same weights
    for (k, a), b in zip(det.model.state_dict().items(), back.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for n, p in back.named_parameters() if ".dfl" not in n)
    more = yolo_detector(path, K + 3)  # another class count: the head is rebuilt, the rest kept
    assert more.num_labels == K + 2
    backbone = "model.0.conv.weight"
    assert torch.equal(more.model.state_dict()[backbone], det.model.state_dict()[backbone])


def test_a_missing_pt_fails_at_once_without_downloading(tmp_path: Path, monkeypatch) -> None:
    import ultralytics.utils.downloads as downloads

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(downloads, "safe_download", no_download)
    monkeypatch.setattr(downloads, "attempt_download_asset", no_download)
    start = time.perf_counter()
    for name in ["structkd-no-such-yolo.pt", str(tmp_path / "nothing.pt")]:
        with pytest.raises(FileNotFoundError, match=r"not a local file.*does not download"):
            yolo_detector(name, K + 1)
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="model YAML"):
        yolo_detector("yolov8n", K + 1)
    with pytest.raises(ValueError, match="neither a local file nor a model YAML"):
        yolo_detector("no-such-model.yaml", K + 1)
    with pytest.raises(ValueError, match="num_classes"):
        yolo_detector("yolov8n.yaml", 1)


def test_without_ultralytics_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import ultralytics -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'structkd\[ultralytics\]' \(AGPL-3.0\)"):
        yolo_detector("yolov8n.yaml", K + 1)


def test_as_detector_finds_the_adapter(yolos) -> None:
    from ultralytics import YOLO

    det = yolos["yolov8n.yaml"]
    assert is_ultralytics_detector(det.model)
    wrapped = as_detector(det.model, min_size=H, max_size=W)
    assert isinstance(wrapped, UltralyticsDetector) and wrapped.model is det.model
    assert detector_family(wrapped) == "yolo" and as_detector(wrapped) is wrapped
    yolo = YOLO("yolov8n.yaml")  # an ultralytics.YOLO object: its DetectionModel is wrapped
    from_yolo = as_detector(yolo)
    assert isinstance(from_yolo, UltralyticsDetector) and from_yolo.model is yolo.model
    assert not is_ultralytics_detector(nn.Conv2d(3, 3, 1))


def _distil(distiller: Distiller, tapped: nn.Module) -> None:
    """One step: finite terms with a "distill" one, whose gradient reaches the tapped module."""
    distiller.train()
    distiller.zero_grad()
    out = distiller(_images(), _targets())
    assert "distill" in out and all(torch.isfinite(v) for v in out.values())
    out["distill"].backward(retain_graph=True)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tapped.parameters())
    sum(v for k, v in out.items() if k != "distill").backward()


def test_distils_yolo_into_yolo_and_across_families(yolos) -> None:
    from structkd.models import DetectorSpec, build_detector

    student = yolos["yolov8n.yaml"]
    same = Distiller(student, yolos["yolo26n.yaml"], "ssim")
    try:
        assert [p.stride for p in same.pairs] == [8, 16, 32]
        _distil(same, student.model.model[15])
    finally:
        same.close()
    torch.manual_seed(0)
    retinanet = build_detector(DetectorSpec("retinanet", K + 1, backbone="resnet18",
                                            fpn_channels=32, min_size=128, max_size=128))
    cross = Distiller(student, retinanet, "mgd")
    try:
        assert [p.stride for p in cross.pairs] == [8, 16, 32]
        _distil(cross, student.model.model[21])
    finally:
        cross.close()
    retinanet.requires_grad_(True)  # it was a (frozen) teacher above; now a student
    back = Distiller(retinanet, yolos["yolo11n.yaml"], "mgd")  # a YOLO teacher for RetinaNet
    try:
        assert [p.stride for p in back.pairs] == [8, 16, 32]
        _distil(back, retinanet.backbone.fpn)
    finally:
        back.close()


def test_rtdetr_losses_and_predictions() -> None:
    det = _build("rtdetr-l.yaml")
    assert det.family == "rtdetr" and det.taps == ["model.model.21", "model.model.24",
                                                    "model.model.27"]
    losses = det.train()(_images(), _targets())
    assert {"class", "bbox", "giou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        out = det.eval()(_images())
    assert [len(o["boxes"]) for o in out] == [100, 100]
    assert all(o["labels"].min() >= 1 and o["labels"].max() <= K for o in out)
    assert all((o["scores"][:-1] >= o["scores"][1:]).all() for o in out)


def test_rtdetr_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    from structkd.models.onnx import OnnxDetector, export_onnx

    det = _build("rtdetr-l.yaml", conf_thresh=0.0)
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    det.eval()
    onnx_det = OnnxDetector(export_onnx(det, tmp_path / "s.onnx", image_size=(H, W)))
    for image in _images(seed=3):
        with torch.no_grad():
            ref = det([image])[0]
        assert len(ref["scores"]) == 100
        assert_same_detections(ref, onnx_det([image])[0], box_atol=1e-2, score_atol=1e-4)


def test_the_family_builder_takes_a_size_for_a_yaml_without_a_scale() -> None:
    from structkd.detectors import family_detector

    def params(name: str, size: str) -> int:
        det = family_detector("ultralytics", name, K + 1, size=size, min_size=H, max_size=W)
        assert isinstance(det, UltralyticsDetector) and det.num_labels == K
        return sum(p.numel() for p in det.parameters())

    nano = params("yolo11.yaml", "tiny")
    assert params("yolo11.yaml", "small") > 3 * nano
    assert params("yolo11n.yaml", "small") == nano  # the name's scale wins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_losses_and_predictions_follow_the_model_to_the_gpu() -> None:
    det = _build("yolo26n.yaml").train()
    det(_images(), _targets())  # the criterion is built on the CPU first
    det.cuda()
    images = [img.cuda() for img in _images()]
    targets = [{k: v.cuda() for k, v in t.items()} for t in _targets()]
    losses = det(images, targets)
    assert all(v.is_cuda and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        out = det.eval()(images)
    assert out[0]["boxes"].is_cuda and len(out[0]["boxes"]) > 0
