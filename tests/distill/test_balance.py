"""Automatic weights: ``calibrate_weight`` sets the ratio of the two gradient norms, measured here
by the test's own ``torch.autograd.grad`` on the same batch; it leaves no trace."""

from __future__ import annotations

import copy

import pytest
import torch

from kdtest import det_batch as _batch
from kdtest import tiny_retinanet as _detector
from structkd.distill import Distiller, calibrate_weight, grad_norms


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return _detector(16), _detector(32)


def _own_ratio(d: Distiller, images, targets) -> float:
    """|g_distill| / |g_detection| on the student parameters both reach, from scratch."""
    losses = d(images, targets)
    det = sum(v for k, v in losses.items() if not k.startswith("distill"))
    dis = sum(v for k, v in losses.items() if k.startswith("distill"))
    params = [p for p in d.student.parameters() if p.requires_grad]
    g_det = torch.autograd.grad(det, params, retain_graph=True, allow_unused=True)
    g_dis = torch.autograd.grad(dis, params, allow_unused=True)
    both = [(a, b) for a, b in zip(g_det, g_dis, strict=True) if a is not None and b is not None]
    n_det = torch.sqrt(sum((a.double() ** 2).sum() for a, _ in both))
    n_dis = torch.sqrt(sum((b.double() ** 2).sum() for _, b in both))
    return float(n_dis / n_det)


@pytest.mark.parametrize("method", ["ssim", "mse", "cwd"])
def test_the_calibrated_weight_gives_the_target_ratio(pair, method: str) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    d = Distiller(student.train(), teacher, method, weight="auto")
    batch = _batch()
    cal = calibrate_weight(d, [batch], ratio=3.0)
    assert d.weight == pytest.approx(cal.weight) and cal.weight > 0
    assert _own_ratio(d, *batch) == pytest.approx(3.0, rel=1e-4)
    d.close()


def test_calibration_leaves_no_trace(pair) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    d = Distiller(student.train(), teacher, "ssim", weight="auto")
    buffers = {n: b.clone() for n, b in d.named_buffers()}
    params = {n: p.detach().clone() for n, p in d.named_parameters()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    calibrate_weight(d, [_batch(0), _batch(1)])
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[n]) for n, b in d.named_buffers())
    assert all(torch.equal(p, params[n]) for n, p in d.named_parameters())
    assert all(p.grad is None for p in d.parameters())
    assert d.training


def test_the_mean_over_batches_sets_the_weight(pair) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    d = Distiller(student.train(), teacher, "ssim", weight="auto")
    batches = [_batch(0), _batch(1)]
    cal = calibrate_weight(d, batches, ratio=2.0)
    params = [p for p in d.student.parameters() if p.requires_grad]
    norms = []
    with d.probing(weight=1.0):
        for b in batches:
            norms.append(grad_norms(d(*b), params, retain_graph=False))
    det = sum(n.detection for n in norms) / 2
    dis = sum(n.distill for n in norms) / 2
    assert cal.weight == pytest.approx(2.0 * det / dis, rel=1e-5)
    assert [r["detection"] for r in cal.per_batch] == pytest.approx([n.detection for n in norms])


def test_an_auto_weight_refuses_to_train_until_measured(pair) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    d = Distiller(student.train(), teacher, "ssim", weight="auto")
    with pytest.raises(RuntimeError, match=r"weight='auto' is not measured yet: call "
                                           r"structkd.distill.calibrate_weight"):
        d(*_batch())
    calibrate_weight(d, [_batch()])
    assert set(d(*_batch())) >= {"distill"}


def test_bad_weights_and_ratios_are_refused(pair) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    with pytest.raises(ValueError, match=r"weight='heavy'; expected a number >= 0, 'auto'"):
        Distiller(student, teacher, "ssim", weight="heavy")
    d = Distiller(student.train(), teacher, "ssim", weight="auto")
    with pytest.raises(ValueError, match=r"ratio=0"):
        calibrate_weight(d, [_batch()], ratio=0)
    with pytest.raises(ValueError, match=r"no batches"):
        calibrate_weight(d, [])
    with pytest.raises(ValueError, match=r"weight=-1; expected a finite number >= 0"):
        d.set_weight(-1)
