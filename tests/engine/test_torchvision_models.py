"""Distillation with detectors built directly by torchvision's builders (weights=None), a small
detector of the tests' own, the object API end to end, torchvision weights offline, and resume
refused when the run changed.

Sized for 2 CPU cores: 64-96 px inputs, one teacher (RetinaNet v2) shared by the module, one
optimiser step per pair. The dry run that measures the levels always runs at 512 px.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.models import detection as tvd

import structkd
from kdtest import distill, slow_except
from structkd.distill import Distiller, FeatureTap, LevelInfo, measure_levels
from structkd.models import torchvision_detector
from structkd.models.weights import weights_file
from structkd.recipes import load_config

NUM_CLASSES = 7  # the synthetic dataset's 6 shapes + background
SIZE = 64
TV = {"weights": None, "weights_backbone": None, "num_classes": NUM_CLASSES}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _batch(size: int = SIZE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    s = size / 64
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]) * s, "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 60.0, 50.0], [20.0, 20.0, 34.0, 36.0]]) * s,
         "labels": torch.tensor([2, 5])},
    ]
    return images, targets


def _step(d: Distiller, images, targets) -> dict[str, torch.Tensor]:
    """One training step's losses: every term finite, their sum back-propagated into the
    student (and never into the teacher)."""
    out = d(images, targets)
    for k, v in out.items():
        assert v.ndim == 0 and torch.isfinite(v), (k, v)
    total = sum(out.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in d.student.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in d.teacher.parameters())
    return out


def _capture(module: nn.Module, store: dict, key: str, *, pre: bool = False, index: int = 0):
    """A hook keeping ``module``'s (first) input or its output."""
    if pre:
        return module.register_forward_pre_hook(lambda m, a: store.__setitem__(key, a[index]))
    return module.register_forward_hook(lambda m, a, o: store.__setitem__(key, o))


def _levels(model: nn.Module, path: str = "backbone") -> dict[str, LevelInfo]:
    with FeatureTap(model, path) as tap:
        return dict(measure_levels(model, tap, path))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores a second one mostly waits (about 2x slower);
    conftest restores the count after each test."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    """RetinaNet v2 (ResNet-50 FPN 256, strides 8..128), shared: a Distiller only freezes it."""
    torch.manual_seed(0)
    return tvd.retinanet_resnet50_fpn_v2(min_size=SIZE, max_size=SIZE, **TV).eval()


# ---- a detector of the tests' own ----------------------------------------------------------
class TinyBackbone(nn.Module):
    """Two maps, at strides 8 and 16, as a list. ``pool``: downsample by 2x2 average pooling,
    which floors odd sizes (convolutions with stride 2 and padding 1 round up)."""

    def __init__(self, width: int = 16, pool: bool = False) -> None:
        super().__init__()

        def down(c_in: int, c_out: int) -> nn.Module:
            if pool:
                return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.AvgPool2d(2),
                                     nn.ReLU())
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU())

        self.stem = nn.Sequential(down(3, width), down(width, width), down(width, width))
        self.down = down(width, 2 * width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c8 = self.stem(x)
        return [c8, self.down(c8)]


class TinyDetector(nn.Module):
    """``backbone`` gives a list of two maps; ``forward(images, targets)`` returns a loss dict in
    train mode. No ``transform``: it batches (equal-size) images itself."""

    def __init__(self, width: int = 16, pool: bool = False) -> None:
        super().__init__()
        self.backbone = TinyBackbone(width, pool)
        self.heads = nn.ModuleList([nn.Conv2d(width, NUM_CLASSES, 1),
                                    nn.Conv2d(2 * width, NUM_CLASSES, 1)])

    def forward(self, images, targets=None):
        feats = self.backbone(torch.stack(list(images)))
        logits = [h(f) for h, f in zip(self.heads, feats, strict=True)]
        if self.training:
            assert targets is not None
            objects = sum(len(t["boxes"]) for t in targets)
            return {"loss_tiny": sum(x.pow(2).mean() for x in logits) * objects / len(targets)}
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                 "labels": torch.zeros(0, dtype=torch.long)} for _ in images]


# ---- pairs of torchvision detectors ---------------------------------------------------------
def test_retinanet_v2_teacher_fcos_student(teacher) -> None:
    torch.manual_seed(0)
    student = tvd.fcos_resnet50_fpn(min_size=SIZE, max_size=SIZE, **TV)
    d = Distiller(student.train(), teacher, "ssim")
    assert [(p.name, p.student, p.teacher, p.stride, p.student_channels, p.teacher_channels)
            for p in d.pairs] == [
        ("s8", "0", "0", 8, 256, 256), ("s16", "1", "1", 16, 256, 256),
        ("s32", "2", "2", 32, 256, 256), ("s64", "p6", "p6", 64, 256, 256),
        ("s128", "p7", "p7", 128, 256, 256)]
    out = _step(d, *_batch())
    assert set(out) == {"classification", "bbox_regression", "bbox_ctrness", "distill"}
    assert out["distill"] > 0
    grad = student.backbone.fpn.layer_blocks[0][0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_fasterrcnn_mobilenet_student_pairs_by_stride(teacher) -> None:
    """MobileNetV3-FPN has two stride-32 maps and a pool at 64: the first stride-32 map pairs
    with the teacher's, the second has no partner, the pool pairs with P6."""
    torch.manual_seed(0)
    student = tvd.fasterrcnn_mobilenet_v3_large_fpn(min_size=SIZE, max_size=SIZE, **TV)
    assert _levels(student) == {"0": LevelInfo(32, 256), "1": LevelInfo(32, 256),
                                "pool": LevelInfo(64, 256)}
    assert _levels(teacher) == {"0": LevelInfo(8, 256), "1": LevelInfo(16, 256),
                                "2": LevelInfo(32, 256), "p6": LevelInfo(64, 256),
                                "p7": LevelInfo(128, 256)}
    d = Distiller(student.train(), teacher, "mse")
    assert [(p.name, p.student, p.teacher, p.stride) for p in d.pairs] == [
        ("s32", "0", "2", 32), ("s64", "pool", "p6", 64)]
    assert list(d.method.levels) == ["s32", "s64"]
    out = _step(d, *_batch())
    assert set(out) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                        "loss_rpn_box_reg", "distill"}
    assert set(d.level_values()) == {"level/s32", "level/s64"}


def test_ssdlite_student_tapped_at_its_backbone(teacher) -> None:
    """SSDlite's backbone gives six maps (672, 480, 512, 256, 256, 128 channels) at strides
    16..512; its transform resizes every batch to 320x320, and the teacher runs on that batch,
    re-normalised from SSD's (0.5, 0.5) statistics to ImageNet's."""
    torch.manual_seed(0)
    student = tvd.ssdlite320_mobilenet_v3_large(**TV)
    assert _levels(student) == {
        "0": LevelInfo(16, 672), "1": LevelInfo(32, 480), "2": LevelInfo(64, 512),
        "3": LevelInfo(128, 256), "4": LevelInfo(256, 256), "5": LevelInfo(512, 128)}
    d = Distiller(student.train(), teacher, "ssim")
    assert [(p.name, p.student, p.teacher, p.student_channels) for p in d.pairs] == [
        ("s16", "0", "1", 672), ("s32", "1", "2", 480), ("s64", "2", "p6", 512),
        ("s128", "3", "p7", 256)]
    assert {n: (a.in_channels, a.out_channels) for n, a in d.method.adapters.items()} == {
        "s16": (672, 256), "s32": (480, 256), "s64": (512, 256), "s128": (256, 256)}
    seen: dict[str, torch.Tensor] = {}
    hooks = [_capture(student.transform, seen, "student"),
             _capture(d.frozen_teacher.runner, seen, "teacher", pre=True),
             _capture(d.method, seen, "ctx", pre=True)]
    try:
        out = _step(d, *_batch())
    finally:
        for h in hooks:
            h.remove()
    assert set(out) == {"bbox_regression", "classification", "distill"}
    s_batch = seen["student"][0].tensors
    assert s_batch.shape == seen["teacher"].shape == (2, 3, 320, 320)
    ctx = seen["ctx"]
    assert ctx.batch_shape == (320, 320) and list(ctx.image_sizes) == [(320, 320)] * 2
    assert {k: tuple(v.shape[-2:]) for k, v in ctx.teacher.items()} == {
        "s16": (20, 20), "s32": (10, 10), "s64": (5, 5), "s128": (3, 3)}
    # Boxes reach the method in the resized batch's coordinates (64 px -> 320 px: x5).
    torch.testing.assert_close(ctx.boxes[0], torch.tensor([[20.0, 30.0, 200.0, 220.0]]))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    torch.testing.assert_close(seen["teacher"] * std + mean, s_batch * 0.5 + 0.5,
                               atol=1e-5, rtol=1e-5)


def test_custom_detector_without_a_transform(teacher) -> None:
    """No ``transform``: the batch is the input of the tapped root (its backbone); the teacher
    sees that very tensor, and the targets as given reach the method (FGD needs the boxes)."""
    torch.manual_seed(0)
    student = TinyDetector().train()
    d = Distiller(student, teacher, "fgd")
    assert [(p.name, p.student, p.teacher, p.student_channels, p.teacher_channels)
            for p in d.pairs] == [("s8", "0", "0", 16, 256), ("s16", "1", "1", 32, 256)]
    seen: dict = {}
    hooks = [_capture(student.backbone, seen, "student", pre=True),
             _capture(d.frozen_teacher.runner, seen, "teacher", pre=True),
             _capture(d.method, seen, "ctx", pre=True)]
    images, targets = _batch()
    try:
        out = _step(d, images, targets)
    finally:
        for h in hooks:
            h.remove()
    assert {"loss_tiny", "distill/fg", "distill/bg"} <= set(out)
    assert torch.equal(seen["teacher"], seen["student"])
    assert torch.equal(seen["student"], torch.stack(images))
    ctx = seen["ctx"]
    assert ctx.image_sizes is None and ctx.batch_shape == (SIZE, SIZE)
    for got, target in zip(ctx.boxes, targets, strict=True):
        assert torch.equal(got, target["boxes"])
    for got, target in zip(ctx.labels, targets, strict=True):
        assert torch.equal(got, target["labels"])
    assert out["distill/fg"] > 0  # the foreground term exists only with boxes


def test_student_map_resized_to_the_teachers(teacher) -> None:
    """72 px: the teacher's convolutions round 9 -> 5 cells at stride 16, the student's average
    pooling floors 9 -> 4; the method sees the student map resized to the teacher's grid."""
    torch.manual_seed(0)
    student = TinyDetector(pool=True).train()
    d = Distiller(student, teacher, "mse")
    assert [(p.name, p.stride) for p in d.pairs] == [("s8", 8), ("s16", 16)]
    seen: dict = {}
    hook = _capture(d.method, seen, "ctx", pre=True)
    try:
        _step(d, *_batch(72))
    finally:
        hook.remove()
    raw = d.tap.levels()
    assert tuple(raw["0"].shape[-2:]) == (9, 9) and tuple(raw["1"].shape[-2:]) == (4, 4)
    ctx = seen["ctx"]
    assert {k: tuple(v.shape[-2:]) for k, v in ctx.teacher.items()} == {"s8": (9, 9),
                                                                        "s16": (5, 5)}
    for k in ctx.teacher:
        assert ctx.student[k].shape[-2:] == ctx.teacher[k].shape[-2:], k
        assert ctx.student[k].shape[1] == d.pairs[0].student_channels * (1 if k == "s8" else 2)


@pytest.mark.parametrize("method", slow_except(["ssim", "mse", "pkd", "cwd", "mgd", "fgd"],
                                               "ssim", "fgd"))
def test_every_method_on_a_torchvision_pair(method: str, teacher) -> None:
    """Faster R-CNN MobileNetV3-FPN student (s32, s64 shared) of the RetinaNet v2 teacher, at
    96 px so that the shared maps are 3x3 and 2x2 (both named: the Faster R-CNN presets of
    PKD, MGD and FGD would keep strides 4-32 only)."""
    torch.manual_seed(0)
    student = tvd.fasterrcnn_mobilenet_v3_large_fpn(min_size=96, max_size=96, **TV)
    d = Distiller(student.train(), teacher, method, levels=["s32", "s64"])
    assert [p.name for p in d.pairs] == ["s32", "s64"]
    out = _step(d, *_batch(96))
    terms = [k for k in out if k.startswith("distill")]
    assert terms and all(math.isfinite(out[k].item()) for k in terms)
    assert set(d.level_values()) == {"level/s32", "level/s64"}
    assert all(math.isfinite(v.item()) for v in d.level_values().values())


# ---- the object API end to end --------------------------------------------------------------
class PlainDetectionDataset(Dataset):
    """Any torch Dataset of (image, target) with torchvision-style targets (no COCO file)."""

    def __init__(self, base: Dataset) -> None:
        self.items = [base[i] for i in range(len(base))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image, target = self.items[i]
        return torch.as_tensor(image).clone(), {
            "boxes": torch.as_tensor(target["boxes"]).clone(),
            "labels": torch.as_tensor(target["labels"]).clone(),
            "image_id": int(target["image_id"])}


@pytest.mark.parametrize("val_kind", ["coco", "plain"])
def test_fit_with_torchvision_detectors(val_kind: str, coco_data, teacher, tmp_path) -> None:
    data = structkd.data
    train_ds = data.CocoDetection(coco_data.train_ann, coco_data.train_images,
                                  data.build_transforms(False))
    val_ds: Dataset = data.CocoDetection(coco_data.val_ann, coco_data.val_images,
                                         data.build_transforms(False))
    if val_kind == "plain":
        val_ds = PlainDetectionDataset(val_ds)
    torch.manual_seed(0)
    student = tvd.fasterrcnn_mobilenet_v3_large_fpn(min_size=SIZE, max_size=SIZE, **TV)
    out = tmp_path / "run"
    result = structkd.fit(student, train_ds, val_ds, teacher=teacher, method="ssim", epochs=1,
                          max_steps=2, out_dir=str(out), progress=False, accelerator="cpu",
                          batch_size=2, num_workers=0, val_every=0, threads=1)
    summary = json.loads((out / "results.json").read_text())
    assert summary["mode"] == "distill" and summary["steps"] == 2
    assert summary["method"]["name"] == "ssim"
    assert {"AP", "AP50", "AP75", "per_class"} <= set(result.metrics)
    assert 0 <= result.metrics["AP"] <= 100
    assert summary["metrics"]["AP"] == result.metrics["AP"]
    assert result.export_prefix == out / "student"
    for name in ("student.safetensors", "student.json", "metrics.csv", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    export = json.loads((out / "student.json").read_text())
    assert export["spec"] is None  # built by user code: rebuilt by that code
    names = export["meta"]["class_names"]
    assert names[0] == "__background__"
    if val_kind == "coco":
        assert names == list(train_ds.class_names) and len(names) == NUM_CLASSES
    else:  # read from the targets: labels are their own category ids
        assert names[1:] == [f"class_{i}" for i in range(1, len(names))]
    from safetensors.torch import load_file

    state = load_file(str(out / "student.safetensors"))
    assert set(state) == set(student.state_dict())  # the student only, no teacher, no adapters


# ---- torchvision weights, offline -----------------------------------------------------------
def test_torchvision_weights_offline(tmp_path, monkeypatch) -> None:
    enum_name = "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    calls: list[str] = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise OSError("[Errno -3] Temporary failure in name resolution")  # as urllib says

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    expected_path = weights_file(enum_name)
    assert expected_path.parent == tmp_path / "torch_home" / "hub" / "checkpoints"
    enum = tvd.RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1
    assert expected_path.name == enum.url.rsplit("/", 1)[-1]
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        torchvision_detector("retinanet_resnet50_fpn_v2", enum_name)
    assert time.perf_counter() - start < 10
    assert calls == [enum.url]
    message = str(err.value)
    assert str(expected_path) in message and "Without internet access" in message
    # The file put where the message says is read from the cache, without any download.
    torch.manual_seed(0)
    reference = tvd.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                              num_classes=91)
    expected_path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), expected_path)
    model, info = torchvision_detector("retinanet_resnet50_fpn_v2", enum_name)
    assert calls == [enum.url]  # no second download attempt
    assert not model.training
    head = "head.classification_head.cls_logits.weight"
    assert torch.equal(model.state_dict()[head], reference.state_dict()[head])
    categories = list(enum.meta["categories"])
    assert info.class_names == categories and len(categories) == 91
    assert info.label_map()[1] == (1, "person") and info.class_names[12] == "N/A"
    assert info.meta["weights_file"] == str(expected_path)
    # The same file given by path.
    model2, info2 = torchvision_detector("retinanet_resnet50_fpn_v2", str(expected_path))
    assert torch.equal(model2.state_dict()[head], reference.state_dict()[head])
    assert len(info2.class_names) == 91  # the class count read from the weights
    assert calls == [enum.url]


# ---- resume refused when the run changed ----------------------------------------------------
def test_resume_refuses_a_changed_method_option_or_teacher(teacher_run, make_overrides,
                                                           tmp_path) -> None:
    common = (f"teacher.checkpoint={teacher_run.export_prefix}", "distill.method=ssim",
              "schedule.max_steps=null")  # 8 images, batch 4: 2 steps an epoch
    part = tmp_path / "part"
    first = distill(load_config(overrides=make_overrides(part, *common, "schedule.epochs=1")))
    resume = (*common, "schedule.epochs=2", "trainer.resume=last")
    saved = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)["structkd"]
    with pytest.raises(ValueError, match=r"cannot resume .*last\.ckpt.*method: checkpoint .*"
                                         r"vs now .*\"weight\": 4\.0"):
        distill(load_config(overrides=make_overrides(part, *resume, "distill.weight=4.0")))
    with pytest.raises(ValueError, match=r"method: .*\"window_size\": 7"):
        distill(load_config(overrides=make_overrides(part, *resume,
                                                     "distill.options={window_size: 7}")))
    # Another teacher: the student exported by the first run (other weights and width).
    with pytest.raises(ValueError, match=r"cannot resume .*teacher: checkpoint") as err:
        distill(load_config(overrides=make_overrides(
            tmp_path / "part", *resume, f"teacher.checkpoint={first.export_prefix}")))
    assert saved["teacher"]["fingerprint"] in str(err.value)
    # Unchanged, the same resume goes on.
    again = distill(load_config(overrides=make_overrides(part, *resume)))
    assert json.loads((again.out_dir / "results.json").read_text())["steps"] == 4
