"""Head outputs through the protocol: each family's raw head predictions decoded into
``HeadLevel`` s, checked against the family's own decoding (torchvision's box coders over its
anchor generator, Ultralytics' ``Detect`` decode), and the refusals of pairs a head method
cannot read."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert

from structkd.detectors import protocol_of
from structkd.distill import Distiller
from structkd.models import build_detector

pytestmark = pytest.mark.usefixtures("one_thread")


def _tv(arch: str, size: int = 128, k: int = 4, width: int = 16, backbone: str = "resnet18"):
    torch.manual_seed(0)
    return build_detector(arch=arch, backbone=backbone, num_classes=k, fpn_channels=width,
                          min_size=size, max_size=size).eval()


@pytest.mark.parametrize("arch", ["fcos", "retinanet"])
def test_torchvision_heads_decode_as_torchvision_does(arch: str) -> None:
    model = _tv(arch)
    view = protocol_of(model)
    batch, _ = model.transform([torch.rand(3, 128, 128), torch.rand(3, 128, 128)])
    with torch.no_grad():
        feats = list(model.backbone(batch.tensors).values())
        raw = model.head(feats)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(raw["bbox_regression"].shape, generator=gen) * 0.5
    raw["bbox_regression"] = raw["bbox_regression"] + noise
    if arch == "fcos":
        raw["bbox_regression"] = raw["bbox_regression"].abs()
    levels = view.head_levels(raw, feats, (128, 128))
    assert [lv.stride for lv in levels] == [8, 16, 32, 64, 128]
    anchors = model.anchor_generator(batch, feats)
    for i in range(2):
        codes = raw["bbox_regression"][i]
        ref = (model.box_coder.decode_single(codes, anchors[i]) if arch == "retinanet"
               else model.box_coder.decode(codes, anchors[i]))
        # torchvision's order: level, row, column, anchor
        mine = torch.cat([lv.boxes()[i].permute(2, 3, 0, 1).reshape(-1, 4) for lv in levels])
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-4)
        logits = torch.cat([lv.logits[i].permute(2, 3, 0, 1).reshape(-1, 3) for lv in levels])
        # the background's column 0 is left out: labels 1..3 are logits 0..2
        torch.testing.assert_close(logits, raw["cls_logits"][i][:, 1:], rtol=0, atol=0)
    info = view.head_info()
    assert info.kind == "dense" and info.bins == 0
    assert info.anchors == (9 if arch == "retinanet" else 1)
    if arch == "fcos":
        q = torch.cat([lv.quality[0].permute(2, 3, 0, 1).reshape(-1, 1) for lv in levels])
        torch.testing.assert_close(q, raw["bbox_ctrness"][0], rtol=0, atol=0)
        score = levels[0].scores()
        expected = (levels[0].logits.sigmoid() * levels[0].quality.sigmoid()).sqrt()
        torch.testing.assert_close(score, expected)


@pytest.mark.parametrize("name", ["yolo11n.yaml", "yolo26n.yaml"])
def test_ultralytics_heads_decode_as_ultralytics_does(name: str) -> None:
    pytest.importorskip("ultralytics")
    from structkd.detectors.ultralytics_build import yolo_detector

    torch.manual_seed(0)
    det = yolo_detector(name, 5, min_size=128, max_size=128).eval()
    view = protocol_of(det)
    head = det.model.model[-1]
    inputs: list = []
    hook = head.register_forward_pre_hook(lambda m, a: inputs.append(list(a[0])))
    with torch.no_grad():
        det.model(torch.rand(2, 3, 128, 128))
    hook.remove()
    with torch.no_grad():
        raw = view.run_head(inputs[0])
    levels = view.head_levels(raw, inputs[0], (128, 128))
    preds = raw[1]["one2many"] if "one2many" in raw[1] else raw[1]
    was = head.end2end
    head.end2end = False
    try:
        ref = head._get_decode_boxes(preds)  # (B, 4, N): centre-size unless the head is xyxy
    finally:
        head.end2end = was
    if not getattr(head, "xyxy", False):
        ref = box_convert(ref.transpose(1, 2), "cxcywh", "xyxy").transpose(1, 2)
    mine = torch.cat([lv.boxes().reshape(2, 4, -1) for lv in levels], dim=-1)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-3)
    scores = torch.cat([lv.logits.reshape(2, 4, -1) for lv in levels], dim=-1)
    torch.testing.assert_close(scores, preds["scores"], rtol=0, atol=0)
    info = view.head_info()
    if name.startswith("yolo26"):
        assert info.bins == 0 and all(lv.aux_logits is not None for lv in levels)
        assert all(lv.distribution is None for lv in levels)
    else:
        assert info.bins == 16 and levels[0].distribution.shape == (2, 1, 4, 16, 16, 16)


def test_best_anchor_keeps_the_highest_scoring_anchor() -> None:
    from structkd.methods import HeadLevel

    logits = torch.randn(2, 3, 4, 5, 6)
    ltrb = torch.rand(2, 3, 4, 5, 6)
    one = HeadLevel(8, logits, ltrb).best_anchor()
    best = logits.amax(dim=2).argmax(dim=1)  # (B, H, W)
    for b in range(2):
        for y in range(5):
            for x in range(6):
                a = int(best[b, y, x])
                assert torch.equal(one.logits[b, 0, :, y, x], logits[b, a, :, y, x])
                assert torch.equal(one.ltrb[b, 0, :, y, x], ltrb[b, a, :, y, x])


def test_a_head_of_no_kind_and_moved_taps_are_refused() -> None:
    student, teacher = _tv("fcos", width=8), _tv("fcos", width=16)
    with pytest.raises(ValueError, match="leave \\['student_layers'\\] unset"):
        Distiller(student, teacher, "scoreweighted", student_layers="backbone.body")
    rcnn = build_detector(arch="fasterrcnn", backbone="resnet18", num_classes=4,
                          fpn_channels=16, min_size=128, max_size=128)
    with pytest.raises(ValueError, match=r"needs a dense head's predictions per location "
                                         r".*; the teacher's head gives none: FasterRCNN has "
                                         r"no dense head"):
        Distiller(student, rcnn, "scoreweighted")


@pytest.mark.parametrize("name", ["rt_detr", "rt_detr_v2", "d_fine"])
def test_transformers_decoder_layers_leave_the_denoising_queries_out(name: str) -> None:
    pytest.importorskip("transformers")
    from structkd.detectors.transformers_build import transformers_detector

    torch.manual_seed(0)
    det = transformers_detector(name, 4, num_queries=20, min_size=128, max_size=128)
    view = protocol_of(det)
    assert view.head_info().kind == "detr"
    outputs: list = []
    det.model.register_forward_hook(lambda m, a, o: outputs.append(o))
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
                "image_id": torch.tensor(i)} for i in range(2)]
    det.train()(images, targets)
    layers = view.query_layers(outputs[-1])
    assert outputs[-1].intermediate_logits.shape[2] > 20  # denoising queries in training
    # D-FINE reports one more layer in training than its decoder has (an early prediction);
    # detr_kd pairs layers by relative depth, so the last always meets the teacher's last
    assert len(layers) >= det.model.config.decoder_layers
    assert all(q.logits.shape == (2, 20, 3) and q.boxes.shape == (2, 20, 4) for q in layers)
    det.eval()
    batch, sizes = view.batch_images(images)
    with torch.no_grad():
        raw = view.run_queries(batch, sizes)
    last = view.query_layers(raw)[-1]
    torch.testing.assert_close(last.logits, raw.logits, rtol=0, atol=0)
    torch.testing.assert_close(last.boxes, raw.pred_boxes, rtol=0, atol=0)
