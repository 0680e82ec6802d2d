"""Detector construction, neck layout, norms, specs, weights handling and export."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from structkd.models import (
    ARCHS,
    DetectorSpec,
    build_detector,
    count_parameters,
    export_student,
    load_exported,
    neck_channels,
    spec_from_json,
    spec_to_json,
)

SMALL = {"min_size": 96, "max_size": 128}
EXPECTED_STRIDES = {
    "retinanet": {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128},
    "fcos": {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128},
    "fasterrcnn": {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64},
}


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 112)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[5.0, 20.0, 100.0, 90.0], [30.0, 30.0, 50.0, 52.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    return images, targets


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize("arch", ARCHS)
def test_build_train_eval_and_neck(arch: str, backbone: str) -> None:
    torch.manual_seed(0)
    fpn = 48  # not a multiple of 32: exercises the GroupNorm fallback of the FCOS head
    model = build_detector(arch=arch, num_classes=3, backbone=backbone, fpn_channels=fpn, **SMALL)

    # neck layout
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 128, 128))
    assert list(feats) == list(EXPECTED_STRIDES[arch])
    for key, stride in EXPECTED_STRIDES[arch].items():
        assert feats[key].shape == (1, fpn, 128 // stride, 128 // stride), key
    assert neck_channels(model) == fpn
    if arch != "fasterrcnn":  # P6/P7 computed from P5, as in torchvision's v1 RetinaNet and FCOS
        extra = model.backbone.fpn.extra_blocks
        assert extra.use_P5 and extra.p6.in_channels == fpn

    # from scratch: trainable BatchNorm everywhere in the backbone, every parameter trainable
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())
    assert all(p.requires_grad for p in model.parameters())

    model.train()
    images, targets = _batch()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.backbone.body.parameters())

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2 and set(outputs[0]) == {"boxes", "labels", "scores"}


def test_norm_options_and_freezing() -> None:
    frozen = build_detector(
        arch="retinanet",
        num_classes=2,
        backbone="resnet18",
        fpn_channels=32,
        norm="frozen_bn",
        trainable_backbone_layers=2,
    )
    body = list(frozen.backbone.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body)
    trainable = {
        n.split(".")[0] for n, p in frozen.backbone.body.named_parameters() if p.requires_grad
    }
    assert trainable == {"layer3", "layer4"}
    assert count_parameters(frozen, trainable_only=True) < count_parameters(frozen)

    gn = build_detector(
        arch="fcos",
        num_classes=3,
        backbone="mobilenet_v3_large",
        fpn_channels=32,
        norm="gn",
        **SMALL,
    )
    assert any(isinstance(m, nn.GroupNorm) for m in gn.backbone.body.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in gn.modules())
    gn.train()
    images, targets = _batch()
    assert all(torch.isfinite(v) for v in gn(images, targets).values())

    mobile = build_detector(
        arch="fasterrcnn",
        num_classes=2,
        backbone="mobilenet_v3_large",
        fpn_channels=32,
        trainable_backbone_layers=0,
    )
    assert not any(p.requires_grad for p in mobile.backbone.body.parameters())


def test_variants_and_p6p7_input() -> None:
    # torchvision picks P5 vs C5 by comparing widths; with C5 == FPN width (512) it would be wrong
    v2 = build_detector(
        arch="retinanet", num_classes=2, backbone="resnet18", fpn_channels=512, variant="v2"
    )
    assert not v2.backbone.fpn.extra_blocks.use_P5
    assert any(isinstance(m, nn.GroupNorm) for m in v2.head.modules())
    tv = build_detector(
        arch="fasterrcnn",
        num_classes=3,
        backbone="mobilenet_v3_large",
        fpn_channels=32,
        variant="tv_mobilenet",
        **SMALL,
    )
    with torch.no_grad():
        feats = tv.eval().backbone(torch.rand(1, 3, 128, 128))
    assert {k: 128 // v.shape[-1] for k, v in feats.items()} == {"0": 32, "1": 32, "pool": 64}
    images, targets = _batch()
    assert all(torch.isfinite(v) for v in tv.train()(images, targets).values())


def test_spec_json_round_trip(tmp_path: Path) -> None:
    spec = DetectorSpec(
        arch="fcos",
        num_classes=5,
        backbone="resnet34",
        fpn_channels=128,
        min_size=512,
        max_size=683,
        norm="gn",
        score_thresh=0.1,
        detector_kwargs={"nms_thresh": 0.5, "topk_candidates": 500},
    )
    spec_to_json(spec, tmp_path / "spec.json")
    assert spec_from_json(tmp_path / "spec.json") == spec
    assert DetectorSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    resolved = DetectorSpec(arch="retinanet", num_classes=3).resolved()
    assert (resolved.norm, resolved.variant, resolved.trainable_backbone_layers) == ("bn", "v1", 5)
    assert (
        DetectorSpec(
            arch="retinanet", num_classes=3, backbone_weights=("ResNet50_Weights.IMAGENET1K_V1")
        )
        .resolved()
        .norm
        == "frozen_bn"
    )


def test_export_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = DetectorSpec(
        arch="retinanet",
        num_classes=3,
        backbone="resnet18",
        fpn_channels=32,
        score_thresh=0.0,
        detections_per_img=10,
        **SMALL,
    )
    model = build_detector(spec)
    images, targets = _batch()
    model.train()
    model(images, targets)  # moves BatchNorm running statistics away from their init
    model.eval()
    with torch.no_grad():
        expected = model(images)

    weights_path, json_path = export_student(
        model, spec, tmp_path / "out" / "student", extra_meta={"classes": ["cat", "dog"]}
    )
    assert weights_path.name == "student.safetensors" and json_path.name == "student.json"
    stored = load_file(str(weights_path))
    assert not any("teacher" in k for k in stored)
    assert set(stored) == set(model.state_dict())

    loaded, loaded_spec, meta = load_exported(tmp_path / "out" / "student")
    assert meta["classes"] == ["cat", "dog"] and meta["structkd_version"]
    assert loaded_spec == spec.resolved() and not loaded.training
    with torch.no_grad():
        got = loaded(images)
    for a, b in zip(expected, got, strict=True):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key]), key

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student, self.teacher = model, build_detector(spec)

    with pytest.raises(ValueError, match="teacher"):
        export_student(Wrapper(), spec, tmp_path / "bad")
    with pytest.raises(ValueError, match="does not match spec"):
        export_student(
            model,
            DetectorSpec(arch="fcos", num_classes=3, backbone="resnet18", fpn_channels=32),
            tmp_path / "bad",
        )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"arch": "yolo"}, "'yolo'"),
        ({"backbone": "vgg16"}, "'vgg16'"),
        ({"norm": "ln"}, "'ln'"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"weights": "NoSuch_Weights.COCO_V1"}, "NoSuch_Weights.COCO_V1"),
        ({"weights": "RetinaNet_ResNet50_FPN_Weights.NOPE"}, "RetinaNet_ResNet50_FPN_Weights.NOPE"),
        ({"weights": "retinanet"}, "'retinanet'"),
        ({"weights": "FCOS_ResNet50_FPN_Weights.COCO_V1"}, "FCOS_ResNet50_FPN_Weights"),
        ({"backbone_weights": "ResNet18_Weights.IMAGENET1K_V1"}, "ResNet18_Weights"),
        ({"variant": "v2", "arch": "fcos"}, "v2"),
        ({"trainable_backbone_layers": 7}, "trainable_backbone_layers=7"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_spec_raises(kwargs: dict, needle: str) -> None:
    spec = {"arch": "retinanet", "num_classes": 3, "backbone": "resnet50", **kwargs}
    with pytest.raises(ValueError) as info:
        build_detector(spec)
    assert needle in str(info.value)


def test_offline_download_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
    seen_timeouts = []

    def offline(url: str, **_: object) -> None:
        seen_timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    before = socket.getdefaulttimeout()
    name = "RetinaNet_ResNet50_FPN_Weights.COCO_V1"
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        build_detector(arch="retinanet", num_classes=91, weights=name)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert name in message and "download.pytorch.org" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert seen_timeouts == [10.0] and socket.getdefaulttimeout() == before
    with pytest.raises(RuntimeError, match=r"ResNet18_Weights\.IMAGENET1K_V1"):
        build_detector(
            arch="fcos",
            num_classes=3,
            backbone="resnet18",
            backbone_weights="ResNet18_Weights.IMAGENET1K_V1",
        )


def test_cached_coco_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint in torch.hub's cache is used without network: full load and fine-tune load."""
    name = "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128
    ).eval()
    url = torchvision.models.get_weight(name).url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / os.path.basename(urllib.parse.urlparse(url).path))

    model = build_detector(
        arch="fasterrcnn",
        backbone="mobilenet_v3_large",
        num_classes=91,
        weights=name,
        min_size=128,
        max_size=128,
    ).eval()
    assert model.structkd_spec.variant == "tv_mobilenet"
    assert model.structkd_spec.norm == "frozen_bn"
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ours, theirs = model.backbone(x), reference.backbone(x)
    assert list(ours) == list(theirs) == ["0", "1", "pool"]
    for key in ours:  # FrozenBatchNorm2d vs BatchNorm2d: same maths, different rounding
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4)

    tuned = build_detector(
        arch="fasterrcnn", backbone="mobilenet_v3_large", num_classes=4, weights=name
    )
    ref_state, tuned_state = reference.state_dict(), tuned.state_dict()
    differing = {
        k
        for k, v in tuned_state.items()
        if "num_batches_tracked" not in k
        and (v.shape != ref_state[k].shape or not torch.equal(v, ref_state[k]))
    }
    assert {k.rsplit(".", 2)[0] for k in differing} == {"roi_heads.box_predictor"}


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_anchor_size(arch: str) -> None:
    """anchor_size sets the finest level's anchor, doubling per level; default torchvision's 32."""
    common = {"arch": arch, "num_classes": 3, "backbone": "resnet18", "fpn_channels": 16,
              "min_size": 64, "max_size": 64}
    default = build_detector(common)
    small = build_detector({**common, "anchor_size": 8})
    gen = "anchor_generator" if arch == "retinanet" else None
    d_sizes = (default.anchor_generator if gen else default.rpn.anchor_generator).sizes
    s_sizes = (small.anchor_generator if gen else small.rpn.anchor_generator).sizes
    assert [lv[0] for lv in d_sizes] == [32, 64, 128, 256, 512]
    assert [lv[0] for lv in s_sizes] == [8, 16, 32, 64, 128]
    assert default.structkd_spec.anchor_size == 32 and small.structkd_spec.anchor_size == 8
    assert DetectorSpec.from_dict(small.structkd_spec.to_dict()).anchor_size == 8
    assert build_detector({"arch": "fcos", "num_classes": 3}).structkd_spec.anchor_size is None
    with pytest.raises(ValueError, match=r"anchor_size=8 does not apply to arch='fcos'"):
        DetectorSpec(arch="fcos", num_classes=3, anchor_size=8)
    with pytest.raises(ValueError, match=r"anchor_size=0 is invalid"):
        DetectorSpec(arch=arch, num_classes=3, anchor_size=0)
