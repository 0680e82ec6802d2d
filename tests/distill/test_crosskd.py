"""CrossKD's wiring: the student's head features at the cut go through the teacher's remaining
head layers. Checked against the teacher's own head (run whole on the same levels), gradients
(to the student's layers before the cut, never to the teacher), and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from structkd.detectors import protocol_of
from structkd.distill import Distiller
from structkd.models import build_detector

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str, width: int = 16, backbone: str = "resnet18", seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(arch=arch, backbone=backbone, num_classes=4, fpn_channels=width,
                          min_size=64, max_size=64)


def _batch(n: int = 2):
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=gen) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1]),
                "image_id": torch.tensor(i)} for i in range(n)]
    return images, targets


@pytest.mark.parametrize("arch", ["fcos", "retinanet"])
def test_the_head_run_from_any_cut_equals_the_whole_head(arch: str) -> None:
    model = _model(arch).eval()
    view = protocol_of(model)
    images, _ = _batch()
    batch, _ = model.transform(images)
    with torch.no_grad():
        levels = list(model.backbone(batch.tensors).values())
        whole = model.head(levels)
        for cut in range(5):
            paths = view.cross_cuts(cut)
            inputs = {}
            for key, path in paths.items():
                if path is None:
                    inputs[key] = levels
                    continue
                branch = model.get_submodule(path.rsplit(".conv.", 1)[0])
                end = int(path.rsplit(".", 1)[1]) + 1
                inputs[key] = [branch.conv[:end](x) for x in levels]
            raw = view.run_head_from(cut, inputs)
            assert set(raw) == set(whole)
            for k in whole:
                torch.testing.assert_close(raw[k], whole[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected 0\.\.4"):
        view.cross_cuts(5)


def test_a_student_equal_to_its_teacher_has_nothing_to_learn_at_any_cut() -> None:
    """Student = a copy of the teacher (BatchNorm frozen, so both compute the same levels):
    the cross-head predictions are the teacher's own, and both terms vanish."""
    teacher = _model("fcos")
    images, targets = _batch()
    for cut in (0, 2, 4):
        student = copy.deepcopy(teacher)
        d = Distiller(student, teacher, "crosskd", cut=cut).train()
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        out = d(images, targets)
        assert float(out["distill/loc"]) == pytest.approx(0.0, abs=1e-5), cut
        assert float(out["distill/cls"]) == pytest.approx(0.0, abs=1e-5), cut
        d.close()


def test_gradients_reach_the_student_before_the_cut_only() -> None:
    teacher, student = _model("fcos", width=32), _model("fcos", width=16,
                                                        backbone="mobilenet_v3_large", seed=1)
    d = Distiller(student, teacher, "crosskd", cut=2).train()
    images, targets = _batch()
    out = d(images, targets)
    (out["distill/cls"] + out["distill/loc"]).backward()
    conv = student.head.classification_head.conv
    assert conv[0].weight.grad is not None and conv[3].weight.grad.abs().sum() > 0
    assert conv[6].weight.grad is None  # after the cut: the student's own head, not distilled
    assert student.head.classification_head.cls_logits.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert set(n for n, _ in d.method.named_parameters()) == {
        f"branch_adapters.{b}.{w}" for b in ("cls", "reg") for w in ("weight", "bias")}


def test_heads_of_another_design_are_refused() -> None:
    with pytest.raises(ValueError, match="the student's is FCOS's, the teacher's RetinaNet's"):
        Distiller(_model("fcos"), _model("retinanet"), "crosskd")
