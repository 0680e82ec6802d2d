"""Distiller: stride pairing, adapters, the frozen teacher, input sharing, loss bookkeeping."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdtest import slow_except
from structkd.distill import DetectorLosses, Distiller
from structkd.models import build_detector

SIZE = 64
SHARED = ["s8", "s16", "s32", "s64"]


def _detector(arch: str, fpn: int, **kw) -> nn.Module:
    return build_detector(arch=arch, num_classes=3, backbone="resnet18", fpn_channels=fpn,
                          min_size=SIZE, max_size=SIZE, **kw)


def _batch(seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 60.0, 50.0], [20.0, 20.0, 34.0, 36.0]]),
         "labels": torch.tensor([2, 1])},
    ]
    return images, targets


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{buf}": getattr(m, buf).clone()
        for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
        for buf in ("running_mean", "running_var", "num_batches_tracked")
    }


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    """A Faster R-CNN student (FPN 16, strides 4..64) and a RetinaNet teacher (FPN 32, 8..128)."""
    torch.manual_seed(0)
    return _detector("fasterrcnn", 16), _detector("retinanet", 32)


@pytest.fixture
def distiller(pair) -> Distiller:
    student, teacher = (copy.deepcopy(m) for m in pair)
    torch.manual_seed(0)
    return Distiller(student.train(), teacher, "ssim", weight=2.0)


def test_levels_pair_by_stride_with_adapters(distiller: Distiller) -> None:
    by_name = {p.name: p for p in distiller.pairs}
    assert list(by_name) == SHARED
    assert {n: (p.student, p.teacher, p.stride) for n, p in by_name.items()} == {
        "s8": ("1", "0", 8), "s16": ("2", "1", 16), "s32": ("3", "2", 32),
        "s64": ("pool", "p6", 64),
    }
    assert all((p.student_channels, p.teacher_channels) == (16, 32) for p in distiller.pairs)
    adapters = distiller.method.adapters
    assert list(adapters) == SHARED
    for name in SHARED:
        conv = adapters[name]
        assert isinstance(conv, nn.Conv2d)
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 32, (1, 1))
    # The teacher-only stride 128 and the student-only stride 4 are not distilled.
    assert [p.stride for p in distiller.pairs] == [8, 16, 32, 64]


def test_level_selection(pair) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    d = Distiller(student, teacher, levels=["s16", "s8"])
    assert [p.name for p in d.pairs] == ["s8", "s16"]
    assert list(d.method.adapters) == ["s8", "s16"]
    with pytest.raises(ValueError, match=r"\['s4'\].*s8.*s64"):
        Distiller(student, teacher, levels=["s4"])


def test_teacher_is_outside_the_module_tree(distiller: Distiller) -> None:
    teacher = distiller.teacher
    teacher_ids = {id(p) for p in teacher.parameters()}
    own = list(distiller.parameters())
    assert own and not teacher_ids & {id(p) for p in own}
    assert not any("teacher" in k for k in distiller.state_dict())
    assert not any("teacher" in n for n, _ in distiller.named_modules())
    assert all(teacher is not m for m in distiller.modules())
    # Everything registered is the student or the adapters.
    assert {k.split(".")[0] for k in distiller.state_dict()} == {"student", "method"}
    student_ids = {id(p) for p in distiller.student.parameters()}
    adapter_ids = {id(p) for p in distiller.method.parameters()}
    assert {id(p) for p in own} == student_ids | adapter_ids
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_stays_in_eval_mode(distiller: Distiller) -> None:
    distiller.train()
    assert distiller.training and distiller.student.training
    assert all(not m.training for m in distiller.teacher.modules())
    distiller.eval()
    assert not distiller.student.training
    distiller.train(True)
    assert all(not m.training for m in distiller.teacher.modules())


def test_teacher_bn_frozen_student_bn_updates(distiller: Distiller) -> None:
    t_before, s_before = _bn_stats(distiller.teacher), _bn_stats(distiller.student)
    assert t_before and s_before  # both use trainable BatchNorm (built from scratch)
    distiller.train()
    for seed in range(3):
        distiller(*_batch(seed))
    t_after, s_after = _bn_stats(distiller.teacher), _bn_stats(distiller.student)
    assert all(torch.equal(t_before[k], t_after[k]) for k in t_before)
    changed = [k for k in s_before if not torch.equal(s_before[k], s_after[k])]
    assert any(k.endswith("running_mean") for k in changed)
    assert s_after["backbone.body.bn1.num_batches_tracked"] == 3


def test_outputs_sum_to_the_loss(distiller: Distiller) -> None:
    """The dict holds the detection losses and the method's terms only, so summing it (as
    torchvision's reference loop does) gives the training loss; per-level values come from
    ``level_values()``."""
    out = distiller(*_batch())
    det_keys = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(out) == det_keys | {"distill"}
    for k, v in out.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    levels = distiller.level_values()
    assert set(levels) == {f"level/{n}" for n in SHARED}
    per_level = sum(levels.values())
    assert torch.allclose(out["distill"], 2.0 * per_level)  # weight * sum over levels
    assert all(not v.requires_grad for v in levels.values())  # logged values detached
    assert out["distill"].item() > 0


def test_teacher_sees_the_student_transformed_batch(distiller: Distiller) -> None:
    seen: dict[str, list] = {"student_in": [], "teacher_in": [], "teacher_head": []}
    s, t = distiller.student, distiller.teacher
    hooks = [
        s.transform.register_forward_hook(lambda m, a, o: seen["student_in"].append(o[0].tensors)),
        distiller.frozen_teacher.runner.register_forward_hook(
            lambda m, a, o: seen["teacher_in"].append(a[0])),
        t.head.register_forward_hook(lambda m, a, o: seen["teacher_head"].append(1)),
        t.transform.register_forward_hook(lambda m, a, o: seen["teacher_head"].append(2)),
    ]
    try:
        distiller(*_batch())
    finally:
        for h in hooks:
            h.remove()
    assert len(seen["student_in"]) == 1 and len(seen["teacher_in"]) == 1
    assert seen["teacher_in"][0] is seen["student_in"][0] or torch.equal(
        seen["teacher_in"][0], seen["student_in"][0])
    assert seen["teacher_in"][0].shape == (2, 3, SIZE, SIZE)
    assert seen["teacher_head"] == []  # only backbone + FPN of the teacher run


def test_teacher_input_renormalised_when_stats_differ(pair) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    t_mean, t_std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    teacher.transform.image_mean, teacher.transform.image_std = t_mean, t_std
    d = Distiller(student.train(), teacher)
    captured: dict[str, torch.Tensor] = {}
    h1 = student.transform.register_forward_hook(
        lambda m, a, o: captured.__setitem__("s", o[0].tensors))
    h2 = d.frozen_teacher.runner.register_forward_hook(
        lambda m, a, o: captured.__setitem__("t", a[0]))
    try:
        d(*_batch())
    finally:
        h1.remove()
        h2.remove()
    s_mean = torch.tensor(student.transform.image_mean).view(3, 1, 1)
    s_std = torch.tensor(student.transform.image_std).view(3, 1, 1)
    tm, ts = torch.tensor(t_mean).view(3, 1, 1), torch.tensor(t_std).view(3, 1, 1)
    assert not torch.allclose(captured["t"], captured["s"])
    pixels_teacher = captured["t"] * ts + tm
    pixels_student = captured["s"] * s_std + s_mean
    torch.testing.assert_close(pixels_teacher, pixels_student, atol=1e-5, rtol=1e-5)


def test_student_backbone_runs_once_per_step(distiller: Distiller) -> None:
    calls = {"student": 0, "teacher": 0}

    def count(who: str):
        def hook(m, a, o):
            calls[who] += 1
        return hook

    hs = [distiller.student.backbone.register_forward_hook(count("student")),
          distiller.frozen_teacher.runner.register_forward_hook(count("teacher"))]
    try:
        for seed in range(2):
            distiller(*_batch(seed))
    finally:
        for h in hs:
            h.remove()
    assert calls == {"student": 2, "teacher": 2}


def test_gradients_reach_student_and_adapters_not_teacher(distiller: Distiller) -> None:
    out = distiller(*_batch())
    sum(out.values()).backward()
    for name in SHARED:
        w = distiller.method.adapters[name].weight
        assert w.grad is not None and w.grad.abs().sum() > 0, name
    fpn_grad = distiller.student.backbone.fpn.inner_blocks[0][0].weight.grad
    assert fpn_grad is not None and fpn_grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())
    feats = distiller.teacher_features(torch.rand(1, 3, SIZE, SIZE))
    assert all(not f.requires_grad for f in feats.values())


def test_distill_gradient_flows_into_student_features(pair) -> None:
    """The distill term alone (detection losses detached) moves the student's FPN."""
    student, teacher = (copy.deepcopy(m) for m in pair)
    d = Distiller(student.train(), teacher, "mse", weight=1.0)
    out = d(*_batch())
    out["distill"].backward()
    grad = student.backbone.fpn.layer_blocks[1][0].weight.grad  # stride 8 = s8
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("distance", slow_except(["ssim", "mse", "l1"], "ssim", "mse"))
@pytest.mark.parametrize("adapter", ["identity", "conv1x1"])
def test_identical_weights_give_zero_distill(distance: str, adapter: str) -> None:
    torch.manual_seed(0)
    # Frozen BN: train- and eval-mode features coincide, so the copies compute the same maps.
    student = _detector("retinanet", 16, norm="frozen_bn")
    teacher = copy.deepcopy(student)
    d = Distiller(student.train(), teacher, distance, adapter=adapter, weight=3.0)
    out = d(*_batch())
    assert [p.name for p in d.pairs] == ["s8", "s16", "s32", "s64", "s128"]
    # The teacher's BatchNorm is folded into its convolutions (float rounding of ~1e-7 relative
    # per feature): L1, linear in that difference, sums to a few 1e-6; MSE and SSIM to ~1e-12.
    assert out["distill"].item() == pytest.approx(0.0, abs=3e-5)
    for p in d.pairs:
        assert d.level_values()[f"level/{p.name}"].item() == pytest.approx(0.0, abs=1e-5)
    # A perturbed teacher gives a clearly positive loss through the same path.
    with torch.no_grad():
        for prm in teacher.backbone.fpn.parameters():
            prm.add_(0.5 * torch.randn_like(prm))
    assert d(*_batch())["distill"].item() > 1e-3


def test_teacher_neck_is_fused_exact_and_follows_the_teacher(pair) -> None:
    """The feature copy has no BatchNorm left, gives the teacher's own neck outputs, and is
    rebuilt when the teacher's weights change after the Distiller was built."""
    student, teacher = (copy.deepcopy(m) for m in pair)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding changes weights
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    d = Distiller(student.train(), teacher)
    neck = d.frozen_teacher.runner
    assert not any(isinstance(m, nn.BatchNorm2d) for m in neck.modules())
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = teacher.backbone(x)
    got = d.teacher_features(x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5)
    assert d.frozen_teacher.runner is neck  # unchanged teacher: no rebuild
    with torch.no_grad():
        teacher.backbone.fpn.layer_blocks[0][0].weight.mul_(2)
    assert d.frozen_teacher.runner is not neck
    with torch.no_grad():
        expected = teacher.backbone(x)
    torch.testing.assert_close(d.teacher_features(x)["0"], expected["0"], rtol=1e-4, atol=1e-5)


def test_forward_in_eval_mode_errors(distiller: Distiller) -> None:
    distiller.eval()
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        distiller(*_batch())


def test_to_float64_moves_teacher(distiller: Distiller) -> None:
    distiller.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in distiller.teacher.parameters())
    assert all(b.dtype == torch.float64 for b in distiller.teacher.buffers()
               if b.is_floating_point())
    assert all(p.dtype == torch.float64 for p in distiller.parameters())
    feats = distiller.teacher_features(torch.rand(1, 3, SIZE, SIZE, dtype=torch.float64))
    assert all(f.dtype == torch.float64 for f in feats.values())
    assert all(not m.training for m in distiller.teacher.modules())


def test_rejects_models_without_the_tapped_module(pair) -> None:
    with pytest.raises(ValueError, match=r"student \(Conv2d\) has no module 'backbone'"):
        Distiller(nn.Conv2d(3, 3, 1), pair[1])
    with pytest.raises(ValueError, match=r"teacher \(Linear\) has no module 'backbone'"):
        Distiller(copy.deepcopy(pair[0]), nn.Linear(2, 2))


def test_detector_losses_total() -> None:
    torch.manual_seed(0)
    out = DetectorLosses(_detector("retinanet", 16).train())(*_batch())
    assert set(out) == {"classification", "bbox_regression"}


def test_teacher_dtype_sets_the_teachers_precision(pair) -> None:
    """bfloat16: features within a few percent of fp32, returned as fp32; float32: exact fp32
    even inside a bf16 autocast region (the trainer's bf16-mixed)."""
    student, teacher = (copy.deepcopy(m) for m in pair)
    x = torch.rand(2, 3, SIZE, SIZE)
    ref = Distiller(student, teacher).teacher_features(x)
    bf16 = Distiller(student, teacher, teacher_dtype="bfloat16").teacher_features(x)
    fp32 = Distiller(student, teacher, teacher_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = fp32.teacher_features(x)
        followed = Distiller(student, teacher).teacher_features(x)
    for k in ref:
        assert bf16[k].dtype == torch.float32 and exact[k].dtype == torch.float32
        rel = float((bf16[k] - ref[k]).norm() / ref[k].norm())
        assert 0 < rel < 0.05, (k, rel)
        torch.testing.assert_close(exact[k], ref[k])
    assert all(v.dtype == torch.bfloat16 for v in followed.values())  # None follows autocast
    with pytest.raises(ValueError, match="teacher_dtype='int8'"):
        Distiller(student, teacher, teacher_dtype="int8")


def _retinanets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return _detector("retinanet", 16), _detector("retinanet", 32)


@pytest.mark.parametrize(("method", "strides"), [
    ("pkd", [8, 16, 32, 64]),  # MMRazor's PKD configs: P3-P6 of RetinaNet, not P7
    ("mgd", [8, 16, 32, 64, 128]),  # the MGD and FGD authors: every RetinaNet level
    ("fgd", [8, 16, 32, 64, 128]),
    ("cwd", [8, 16, 32, 64, 128]),
    ("ssim", [8, 16, 32, 64, 128]),
])
def test_presets_choose_the_authors_levels(method: str, strides: list[int]) -> None:
    student, teacher = _retinanets()
    d = Distiller(student, teacher, method)
    assert [p.stride for p in d.pairs] == strides
    assert list(d.method.levels) == [f"s{s}" for s in strides]
    # Explicit levels win over the preset's set.
    d = Distiller(student, teacher, method, levels=["s8", "s128"])
    assert list(d.method.levels) == ["s8", "s128"]


def test_faster_rcnn_presets_distil_p2_to_p5(pair) -> None:
    student = copy.deepcopy(pair[0])
    fast_teacher = _detector("fasterrcnn", 32)
    for method in ("pkd", "mgd", "fgd"):
        d = Distiller(copy.deepcopy(student), fast_teacher, method)
        assert d.options["preset"] == "fasterrcnn"
        assert [p.stride for p in d.pairs] == [4, 8, 16, 32], method


def test_a_family_without_a_preset_says_which_it_uses(caplog) -> None:
    torch.manual_seed(0)
    student, teacher = _detector("fcos", 16), _detector("retinanet", 32)
    with caplog.at_level("INFO", logger="structkd.distill"):
        d = Distiller(student, teacher, "pkd")
    assert d.options["preset"] == "retinanet"
    assert "pkd has no preset for fcos students; falling back to its retinanet preset " \
        "{'weight': 10.0}, whose weight was tuned against RetinaNet's losses: with structkd's " \
        "engine set the weight to 'auto'" in caplog.text
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    caplog.clear()
    with caplog.at_level("INFO", logger="structkd.distill"):
        d = Distiller(student, teacher, "fgd")  # FGD has an FCOS preset
    assert d.options["preset"] == "fcos" and "no preset" not in caplog.text


def test_features_pairs_levels_without_adapters(pair) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    d = Distiller(student, teacher, "ssim")
    images, _ = _batch()
    s, t = d.features(images)
    assert list(s) == list(t) == [p.name for p in d.pairs]
    for p in d.pairs:
        assert s[p.name].shape[1] == p.student_channels
        assert t[p.name].shape[1] == p.teacher_channels
        assert s[p.name].shape[-2:] == t[p.name].shape[-2:]
    assert student.training  # its mode is restored


@pytest.mark.parametrize("layers", [[], "", [""], [3]])
def test_empty_or_malformed_layer_lists_are_refused(pair, layers) -> None:
    student, teacher = (copy.deepcopy(m) for m in pair)
    with pytest.raises(ValueError, match=r"student_layers=.*expected a module path"):
        Distiller(student, teacher, student_layers=layers)
    with pytest.raises(ValueError, match=r"teacher_layers=.*expected a module path"):
        Distiller(student, teacher, teacher_layers=layers)


def test_a_teacher_on_its_own_device_gives_the_same_losses(pair) -> None:
    """``teacher_device`` (a second GPU for multi-GPU users; here the CPU beside a CPU student,
    the only device kind this machine has): same values, the teacher stays there."""
    student, teacher = (copy.deepcopy(m) for m in pair)
    torch.manual_seed(0)
    a = Distiller(copy.deepcopy(student).train(), copy.deepcopy(teacher), "ssim", weight=2.0)
    torch.manual_seed(0)
    b = Distiller(copy.deepcopy(student).train(), copy.deepcopy(teacher), "ssim", weight=2.0,
                  teacher_device="cpu")
    images, targets = _batch()
    torch.manual_seed(1)  # Faster R-CNN samples its proposals
    la = a(images, targets)
    torch.manual_seed(1)
    lb = b(images, targets)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    b.to(torch.float64)
    assert next(b.teacher.parameters()).dtype == torch.float64
    assert next(b.teacher.parameters()).device == torch.device("cpu")
