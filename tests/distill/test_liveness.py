"""Distillation that cannot be silently off: each way it goes quiet is caught at the start, with
one message naming the tap, level or parameter group."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdtest import det_batch as _batch
from kdtest import tiny_retinanet as _detector
from structkd.distill import Distiller, check_distillation
from structkd.methods import METHODS, register_method
from structkd.methods.base import DistillMethod


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return _detector(16), _detector(32)


def _copies(pair):
    return (copy.deepcopy(m) for m in pair)


def test_a_working_distillation_passes_and_leaves_no_trace(pair) -> None:
    student, teacher = _copies(pair)
    d = Distiller(student.train(), teacher, "ssim", weight=2.0)
    buffers = {n: b.clone() for n, b in d.named_buffers()}
    rng = torch.get_rng_state()
    report = check_distillation(d, *_batch())
    assert report["term"] > 0 and report["grad_norm"] > 0
    assert report["reached_groups"] == ["backbone.body", "backbone.fpn"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[n]) for n, b in d.named_buffers())
    assert all(p.grad is None for p in d.parameters())


def test_a_tap_on_a_module_the_forward_never_calls(pair) -> None:
    student, teacher = _copies(pair)
    student.unused = nn.Conv2d(3, 8, 3)  # exists, never called by the detector's forward
    with pytest.raises(ValueError, match=r"student taps \['unused'\] never ran when 'backbone' "
                                         r"ran"):
        Distiller(student, teacher, student_layers=["backbone", "unused"])


def test_a_tap_whose_own_module_cannot_take_the_image_batch_names_the_tap(pair) -> None:
    """A tap outside the family's root makes its top-level parent the root of the dry run; a
    module that cannot take the image batch is named, not a convolution's shape error."""
    student, teacher = _copies(pair)
    student.aux = nn.Conv2d(64, 8, 3)  # never called by the forward, wants 64 channels
    with pytest.raises(ValueError, match=r"student taps \['aux'\]: 'aux' failed on a blank "
                                         r"512x512 image batch \(RuntimeError: "):
        Distiller(student, teacher, student_layers=["aux"])
    with pytest.raises(ValueError, match=r"student taps \['anchor_generator'\]: "
                                         r"'anchor_generator' failed"):
        Distiller(student, teacher, student_layers=["anchor_generator"])


def test_a_ddp_prefix_on_a_tap_path_says_to_drop_it(pair) -> None:
    student, teacher = _copies(pair)
    wrapped = nn.DataParallel(student)  # on CPU: a plain wrapper, like DDP's ``module.``
    with pytest.raises(ValueError, match=r"has no module 'module'.*drop the 'module.' "
                                         r"prefix"):
        Distiller(wrapped, teacher, student_layers="module.backbone")
    d = Distiller(wrapped.train(), teacher, "ssim")  # paths relative to the inner detector
    assert check_distillation(d, *_batch())["grad_norm"] > 0


def test_a_layer_list_with_a_level_that_pairs_with_nothing(pair) -> None:
    student, teacher = _copies(pair)
    # layer1 has stride 4; the teacher's FPN starts at stride 8
    d = Distiller(student.train(), teacher, "ssim",
                  student_layers=["backbone.body.layer1", "backbone.fpn"])
    with pytest.raises(ValueError, match=r"tapped student layer\(s\) \['backbone.body.layer1'\] "
                                         r"pair with no teacher level"):
        check_distillation(d, *_batch())


def test_a_constant_teacher(pair) -> None:
    student, teacher = _copies(pair)
    with torch.no_grad():
        for p in teacher.backbone.fpn.parameters():
            p.zero_()
    d = Distiller(student.train(), teacher, "ssim")
    with pytest.raises(ValueError, match=r"the teacher's level s8 \(its tapped map '0'\) is "
                                         r"constant \(0\)"):
        check_distillation(d, *_batch())


def test_a_frozen_tapped_part(pair) -> None:
    student, teacher = _copies(pair)
    for p in student.backbone.parameters():
        p.requires_grad_(False)
    d = Distiller(student.train(), teacher, "ssim")
    with pytest.raises(ValueError, match=r"reaches none of the student's trainable parameters "
                                         r"\(taps \['backbone'\]; trainable groups \['head."):
        check_distillation(d, *_batch())


def test_a_weight_of_zero(pair) -> None:
    student, teacher = _copies(pair)
    d = Distiller(student.train(), teacher, "ssim", weight=0.0)
    with pytest.raises(ValueError, match=r"weight is 0.*use method 'none'"):
        check_distillation(d, *_batch())


class _Constant(DistillMethod):
    """A broken user method: its value does not depend on the student (or only as 0 x it)."""

    name = "constant_test"

    def __init__(self, levels, *, weight: float = 1.0, adapter: str = "auto",
                 zero_grad: bool = False) -> None:
        super().__init__(levels, weight=weight, adapter=adapter)
        self.zero_grad = zero_grad

    def level_loss(self, name, student, teacher, ctx):
        if self.zero_grad:
            return student.sum() * 0.0 + 1.0
        return torch.ones((), device=student.device)


@pytest.mark.parametrize("zero_grad, message", [
    (False, r"reaches none of the student's trainable parameters"),
    (True, r"gradient norm of 0 on the student's groups \['backbone.body', 'backbone.fpn'\]"),
])
def test_a_method_whose_term_is_constant(pair, zero_grad: bool, message: str) -> None:
    student, teacher = _copies(pair)
    register_method("constant_test", replace=True)(_Constant)
    try:
        d = Distiller(student.train(), teacher, "constant_test", zero_grad=zero_grad)
        with pytest.raises(ValueError, match=message):
            check_distillation(d, *_batch())
    finally:
        METHODS.pop("constant_test", None)


def test_a_level_tapped_on_frozen_layers_is_named(pair) -> None:
    """Two tapped levels, the first behind frozen layers only: the total gradient reaches the
    student (through the second), but the first level would move nothing; it is named."""
    student, teacher = _copies(pair)
    for name, p in student.backbone.body.named_parameters():
        p.requires_grad_(name.startswith("layer4"))
    layers = ["backbone.body.layer2", "backbone.body.layer4"]
    d = Distiller(student.train(), teacher, "mse", student_layers=layers, teacher_layers=layers)
    with pytest.raises(ValueError, match=r"the student's level\(s\) s8 \(tap "
                                         r"'backbone.body.layer2'\) depend on no trainable "
                                         r"parameter"):
        check_distillation(d, *_batch())
    for p in student.backbone.body.layer2.parameters():  # trainable again: both levels learn
        p.requires_grad_(True)
    assert check_distillation(d, *_batch())["levels"] == ["s8", "s32"]
