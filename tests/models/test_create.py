"""``structkd.detector``: one way to make a detector of any family, by name or path; each kind
of name builds what its own builder builds (compared with that builder's output)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import structkd
from kdtest import IMAGE_SIZE, NUM_CLASSES
from structkd.detectors import detector_family, protocol_of
from structkd.models import DetectorSpec, build_detector, export_student


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_structkd_builds_and_torchvision_builders() -> None:
    torch.manual_seed(0)
    made = structkd.detector("fcos", NUM_CLASSES, backbone="resnet18", fpn_channels=16,
                             min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)
    torch.manual_seed(0)
    ref = build_detector(DetectorSpec("fcos", NUM_CLASSES, "resnet18", fpn_channels=16,
                                      min_size=IMAGE_SIZE, max_size=IMAGE_SIZE))
    assert _same_weights(made, ref) and detector_family(made) == "fcos"
    tv = structkd.detector("ssdlite320_mobilenet_v3_large", NUM_CLASSES)
    assert protocol_of(tv).num_classes == NUM_CLASSES and tv.training
    small = structkd.detector("retinanet_resnet50_fpn", NUM_CLASSES, min_size=96, max_size=96)
    assert small.transform.min_size == (96,)


def test_other_families_by_name() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("ultralytics")
    detr = structkd.detector("rt_detr", NUM_CLASSES, num_queries=50)
    yolo = structkd.detector("yolo11n.yaml", NUM_CLASSES, min_size=IMAGE_SIZE,
                             max_size=IMAGE_SIZE)
    assert (detector_family(detr), detector_family(yolo)) == ("detr", "yolo")
    assert protocol_of(detr).num_classes == protocol_of(yolo).num_classes == NUM_CLASSES


def test_saved_detectors_by_path(tmp_path: Path) -> None:
    spec = DetectorSpec("retinanet", NUM_CLASSES, "resnet18", fpn_channels=16,
                        min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)
    model = build_detector(spec)
    export_student(model, spec, tmp_path / "student")
    for given in ("student", "student.safetensors", "student.json"):
        assert _same_weights(structkd.detector(tmp_path / given), model)
    with pytest.raises(ValueError, match=r"predicts 6 classes \(num_classes=7\); "
                                         r"num_classes=3 was asked for"):
        structkd.detector(tmp_path / "student", 3)
    with pytest.raises(ValueError, match=r"is a saved detector; options \['min_size'\]"):
        structkd.detector(tmp_path / "student", min_size=32)


def test_what_cannot_be_made_is_named() -> None:
    with pytest.raises(ValueError, match=r"'retinanet_resnet50_fpn_v3' is not a detector "
                                         r"structkd can make \(did you mean "
                                         r"'retinanet_resnet50_fpn_v2'"):
        structkd.detector("retinanet_resnet50_fpn_v3", NUM_CLASSES)
    with pytest.raises(ValueError, match=r"detector\('fcos'\) builds a new detector: give "
                                         r"num_classes"):
        structkd.detector("fcos")
