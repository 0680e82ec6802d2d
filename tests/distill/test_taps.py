"""FeatureTap: outputs of any form, paths, removal, no stacking, deepcopy, pickling, DDP and
torch.compile.

Detectors are tiny (ResNet-18, FPN 16/32, 64 px images) so the file stays fast on 2 CPU cores;
the torch.compile test uses the "eager" backend (Dynamo traces, nothing is compiled to C++).
"""

from __future__ import annotations

import copy
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from structkd.distill import Distiller, FeatureTap, as_levels
from structkd.distill.taps import _Hook
from structkd.models import build_detector

SIZE = 64


def _detector(fpn: int, **kw) -> nn.Module:
    return build_detector(arch="retinanet", num_classes=3, backbone="resnet18",
                          fpn_channels=fpn, min_size=SIZE, max_size=SIZE, **kw)


def _batch(seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def _tap_hooks(model: nn.Module) -> dict[str, list[_Hook]]:
    """structkd hooks by module name (forward and forward-pre hooks)."""
    out: dict[str, list[_Hook]] = {}
    for name, m in model.named_modules():
        hooks = [h for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()
                 if isinstance(h, _Hook)]
        if hooks:
            out[name] = hooks
    return out


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores a second one mostly waits (about 2x slower);
    conftest restores the count after each test."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    """A RetinaNet student (FPN 16, frozen BN: train-mode features are deterministic) and a
    RetinaNet teacher (FPN 32)."""
    torch.manual_seed(0)
    return _detector(16, norm="frozen_bn"), _detector(32)


@pytest.fixture
def models(pair) -> tuple[nn.Module, nn.Module]:
    return tuple(copy.deepcopy(m) for m in pair)  # type: ignore[return-value]


class _Outputs(nn.Module):
    """Children that return a tensor, a tuple, a list and a dict of (B, C, H, W) maps."""

    class _Tensor(nn.Module):
        def forward(self, x):
            return x * 2

    class _Tuple(nn.Module):
        def forward(self, x):
            return x, x[..., ::2, ::2]

    class _List(nn.Module):
        def forward(self, x):
            return [x + 1, x[..., ::4, ::4]]

    class _Dict(nn.Module):
        def forward(self, x):
            return {"p3": x - 1, "p4": x[..., ::2, ::2] * 3}

    def __init__(self) -> None:
        super().__init__()
        self.tensor, self.tuple, self.list, self.dict = (
            self._Tensor(), self._Tuple(), self._List(), self._Dict())

    def forward(self, x):
        return self.tensor(x), self.tuple(x), self.list(x), self.dict(x)


# ---- outputs ----------------------------------------------------------------------------------
def test_as_levels_names_every_output_form() -> None:
    a, b = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 2, 2)
    assert list(as_levels(a).items()) == [("0", a)]
    assert list(as_levels((a, b))) == ["0", "1"] and as_levels((a, b))["1"] is b
    assert list(as_levels([a, b])) == ["0", "1"]
    assert list(as_levels({"p3": a, 4: b})) == ["p3", "4"]
    assert list(as_levels(a, prefix="layer2")) == ["layer2"]  # one map: the prefix alone
    assert list(as_levels({"x": a, "y": b}, prefix="fpn")) == ["fpn/x", "fpn/y"]
    with pytest.raises(ValueError, match=r"tapped output '0' is \(2, 4, 4\)"):
        as_levels(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"tapped output '1' is int"):
        as_levels([a, 3])
    for bad in (None, "maps", 3.0):
        with pytest.raises(ValueError, match="expected a tensor, a dict, a list or a tuple"):
            as_levels(bad)


@pytest.mark.parametrize(("path", "keys"), [
    ("tensor", ["0"]), ("tuple", ["0", "1"]), ("list", ["0", "1"]), ("dict", ["p3", "p4"]),
])
def test_tap_accepts_tensor_tuple_list_and_dict_outputs(path: str, keys: list[str]) -> None:
    model = _Outputs()
    x = torch.rand(2, 3, 8, 8)
    with FeatureTap(model, path) as tap:
        expected = as_levels(getattr(model, path)(x))
        tap.clear()
        model(x)
        got = tap.levels()
    assert list(got) == keys
    for k in keys:
        torch.testing.assert_close(got[k], expected[k])


def test_list_of_paths_gives_one_level_per_module_named_by_path(models) -> None:
    student, _ = models
    body = "backbone.body"
    tap = FeatureTap(student, [f"{body}.layer2", f"{body}.layer3", "backbone.fpn"])
    x = torch.rand(1, 3, SIZE, SIZE)
    student.eval()
    with torch.no_grad():
        student.backbone(x)
    levels = tap.levels()
    assert list(levels)[:2] == [f"{body}.layer2", f"{body}.layer3"]  # tensors: the path alone
    assert [k for k in levels if k.startswith("backbone.fpn/")] == [
        "backbone.fpn/0", "backbone.fpn/1", "backbone.fpn/2", "backbone.fpn/p6", "backbone.fpn/p7"]
    assert levels[f"{body}.layer2"].shape == (1, 128, SIZE // 8, SIZE // 8)  # ResNet-18 C3
    assert levels[f"{body}.layer3"].shape == (1, 256, SIZE // 16, SIZE // 16)
    tap.close()


def test_distiller_with_a_list_of_student_layers_pairs_them_by_stride(models) -> None:
    student, teacher = models
    body = "backbone.body"
    d = Distiller(student.train(), teacher, "mse",
                  student_layers=[f"{body}.layer2", f"{body}.layer3"])
    assert [(p.name, p.student, p.teacher, p.student_channels, p.teacher_channels)
            for p in d.pairs] == [("s8", f"{body}.layer2", "0", 128, 32),
                                  ("s16", f"{body}.layer3", "1", 256, 32)]
    out = d(*_batch())
    assert torch.isfinite(out["distill"]) and out["distill"] > 0


def test_distiller_on_a_module_returning_one_tensor(models) -> None:
    """A tapped module returning one tensor gives one level, paired by its measured stride."""
    student, teacher = models
    d = Distiller(student.train(), teacher, "mse", student_layers="backbone.body.layer3")
    assert [(p.name, p.student, p.teacher) for p in d.pairs] == [("s16", "0", "1")]
    assert torch.isfinite(d(*_batch())["distill"])


def test_unknown_path_lists_the_children(models) -> None:
    student, _ = models
    with pytest.raises(ValueError, match=r"no module 'backbone\.fpnx'; children of "
                                         r"'backbone': \['body', 'fpn'\]"):
        FeatureTap(student, "backbone.fpnx")
    with pytest.raises(ValueError, match=r"no module 'neck\.out'; children of RetinaNet: "
                                         r"\['backbone', 'anchor_generator', 'head', "
                                         r"'transform'\]"):
        FeatureTap(student, ["backbone", "neck.out"])
    # A bad input/batch path fails before any hook is placed, and keeps an older tap working.
    tap = FeatureTap(student, "backbone")
    with pytest.raises(ValueError, match="no module 'transfrm'"):
        FeatureTap(student, "backbone", batch_path="transfrm")
    assert not tap.closed and list(_tap_hooks(student)) == ["backbone"]
    assert _all_hooks(student) == 1


# ---- lifecycle ----------------------------------------------------------------------------
def test_close_removes_every_hook_and_leaves_the_output_unchanged(models) -> None:
    student, _ = models
    student.eval()
    x = [torch.rand(3, SIZE, SIZE)]
    assert _all_hooks(student) == 0
    with torch.no_grad():
        before = student(x)
        tap = FeatureTap(student, ["backbone.body", "backbone.fpn"], input_path="backbone",
                         batch_path="transform")
        assert _all_hooks(student) == 4
        tapped = student(x)
        assert list(tap.levels())[:1] == ["backbone.body/0"] and tap.input() is not None
        tap.close()
        after = student(x)
    assert tap.closed and _all_hooks(student) == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())
    for out in (tapped, after):
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(out[0][k], before[0][k])
    with pytest.raises(RuntimeError, match="closed"):
        tap.levels()
    tap.close()  # closing twice is harmless


def test_context_manager_removes_the_hooks(models) -> None:
    student, _ = models
    x = torch.rand(1, 3, SIZE, SIZE)
    with FeatureTap(student, "backbone") as tap:
        assert _all_hooks(student) == 1
        student.eval()
        with torch.no_grad():
            student.backbone(x)
        assert set(tap.levels()) == {"0", "1", "2", "p6", "p7"}
    assert tap.closed and _all_hooks(student) == 0
    with pytest.raises(RuntimeError, match="closed"), FeatureTap(student, "backbone"):
        raise RuntimeError("closed on error too")
    assert _all_hooks(student) == 0


def test_a_second_tap_replaces_the_first(models) -> None:
    """Taps never stack: one hook per module, the newest tap's; the older one says so."""
    student, _ = models
    first = FeatureTap(student, "backbone")
    second = FeatureTap(student, "backbone")
    hooks = _tap_hooks(student)
    assert list(hooks) == ["backbone"] and len(hooks["backbone"]) == 1
    assert hooks["backbone"][0].tap is second
    assert first.closed and not second.closed
    student.eval()
    with torch.no_grad():
        student.backbone(torch.rand(1, 3, SIZE, SIZE))
    assert set(second.levels()) == {"0", "1", "2", "p6", "p7"}
    with pytest.raises(RuntimeError, match=r"closed \(or replaced by a newer tap on the same "
                                           r"model\); create a new one"):
        first.levels()
    # A tap on a wrapper of the same model also replaces it (it sees through wrappers).
    third = FeatureTap(torch.compile(student, backend="eager"), "backbone.fpn")
    assert second.closed and list(_tap_hooks(student)) == ["backbone.fpn"]
    third.close()


def test_a_second_distiller_on_the_same_student_leaves_one_set_of_hooks(models) -> None:
    student, teacher = models
    student.train()
    first = Distiller(student, teacher, "mse")
    second = Distiller(student, teacher, "mse")
    hooks = _tap_hooks(student)
    assert {k: len(v) for k, v in hooks.items()} == {"backbone": 1, "transform": 1}
    assert all(h.tap is second.tap for v in hooks.values() for h in v)
    assert _all_hooks(teacher) == 0  # the teacher's dry-run tap is gone
    assert torch.isfinite(second(*_batch())["distill"])
    with pytest.raises(RuntimeError, match="replaced by a newer tap"):
        first(*_batch())
    second.close()
    assert _all_hooks(student) == 0


def test_a_distiller_that_fails_to_build_leaves_no_hooks(models) -> None:
    student, teacher = models
    with pytest.raises(ValueError, match=r"levels \['s4'\] are not shared"):
        Distiller(student.train(), teacher, levels=["s4"])
    assert _all_hooks(student) == 0 and _all_hooks(teacher) == 0
    # Also with a teacher tapped inside its root (a tap that lives on the teacher).
    with pytest.raises(ValueError, match=r"levels \['s4'\] are not shared"):
        Distiller(student, teacher, "mse", teacher_layers=["backbone.body.layer2"],
                  levels=["s4"])
    assert _all_hooks(student) == 0 and _all_hooks(teacher) == 0
    d = Distiller(student, teacher, "mse", student_layers=["backbone.body.layer2"],
                  teacher_layers=["backbone.body.layer2"])
    assert _all_hooks(teacher) == 1
    d.close()
    assert _all_hooks(student) == 0 and _all_hooks(teacher) == 0


def test_student_equal_to_teacher_through_a_wrapper_is_refused(models) -> None:
    student, _ = models
    with pytest.raises(ValueError, match="same module"):
        Distiller(torch.compile(student, backend="eager"), student)


def test_a_custom_transform_attribute_is_not_torchvisions(models) -> None:
    """A model whose ``transform`` is a plain callable gives its batch by its root's input."""
    _, teacher = models

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transform = lambda image: image * 1.0  # e.g. a torchvision.transforms.v2 chain
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1),
                                          nn.Conv2d(8, 8, 3, 2, 1))

        def forward(self, images, targets=None):
            x = torch.stack([self.transform(i) for i in images])
            return {"loss": self.backbone(x).mean()}

    d = Distiller(Tiny().train(), teacher, "mse")
    assert [p.name for p in d.pairs] == ["s8"]
    assert torch.isfinite(d(*_batch())["distill"])


# ---- copies -------------------------------------------------------------------------------
def test_deepcopy_gives_an_independent_working_distiller(models) -> None:
    student, teacher = models
    d = Distiller(student.train(), teacher, "mse")
    clone = copy.deepcopy(d)
    assert clone.student is not d.student and clone.tap is not d.tap
    assert clone.tap.model is clone.student
    hooks = _tap_hooks(clone.student)
    assert {k: len(v) for k, v in hooks.items()} == {"backbone": 1, "transform": 1}
    assert all(h.tap is clone.tap for v in hooks.values() for h in v)
    assert all(h.tap is d.tap for v in _tap_hooks(d.student).values() for h in v)
    with torch.no_grad():  # the copy's student now computes other features
        for p in clone.student.backbone.fpn.parameters():
            p.add_(0.5)
    images, targets = _batch()
    out = d(images, targets)
    original = {k: v.detach().clone() for k, v in d.tap.levels().items()}
    out_clone = clone(images, targets)
    assert torch.isfinite(out_clone["distill"])
    assert out_clone["distill"].item() != pytest.approx(out["distill"].item())
    recorded = clone.tap.levels()
    # The copy's hooks recorded the copy's features: its own backbone on its own batch...
    batch, _, _ = clone.tap.batch()
    with torch.no_grad():
        expected = clone.student.backbone(batch)
    for k, v in recorded.items():
        torch.testing.assert_close(v, expected[k])
    # ...and the original's record is untouched by the copy's forward.
    for k, v in d.tap.levels().items():
        assert torch.equal(v, original[k])
        assert not torch.allclose(v, recorded[k])
    clone.close()
    assert _all_hooks(clone.student) == 0 and len(_tap_hooks(d.student)) == 2


def test_pickle_round_trip(models) -> None:
    """What DDP spawn does: pickle the Distiller, unpickle it (in a fresh process), run it."""
    student, teacher = models
    d = Distiller(student.train(), teacher, "ssim")
    images, targets = _batch()
    expected = d(images, targets)["distill"].item()
    assert d.frozen_teacher._copy  # the fused teacher copy exists now...
    tap_ids = [i for m in d.student.modules() for i, h in m._forward_hooks.items()
               if isinstance(h, _Hook)]
    blob = pickle.dumps(d)
    saved = RemovableHandle.next_id
    try:
        # A fresh process counts hook ids from 0 again; simulate one that reached our ids.
        RemovableHandle.next_id = min(tap_ids)
        loaded = pickle.loads(blob)
        assert RemovableHandle.next_id > max(tap_ids)
        # A hook registered after unpickling must not replace the tap's hooks.
        extra = [loaded.student.backbone.register_forward_hook(lambda m, a, o: None),
                 loaded.student.transform.register_forward_hook(lambda m, a, o: None)]
    finally:
        RemovableHandle.next_id = max(RemovableHandle.next_id, saved)
    assert not loaded.frozen_teacher._copy  # ...but is not pickled: rebuilt on first use
    hooks = _tap_hooks(loaded.student)
    assert {k: len(v) for k, v in hooks.items()} == {"backbone": 1, "transform": 1}
    assert all(h.tap is loaded.tap for v in hooks.values() for h in v)
    assert loaded.tap.model is loaded.student and loaded.tap._store == {}
    out = loaded(images, targets)
    assert out["distill"].item() == pytest.approx(expected, rel=1e-5)
    sum(out.values()).backward()
    for h in extra:
        h.remove()
    loaded.close()
    assert _all_hooks(loaded.student) == 0


# ---- wrappers ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_student(models) -> None:
    student, teacher = models
    reference = Distiller(copy.deepcopy(student).train(), teacher, "mse")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(student.train())
        d = Distiller(ddp, teacher, "mse")
        d.method.load_state_dict(reference.method.state_dict())
        assert d.tap.model is student  # the hooks sit on the wrapped module
        assert {k: len(v) for k, v in _tap_hooks(student).items()} == {"backbone": 1,
                                                                      "transform": 1}
        images, targets = _batch()
        out = d(images, targets)
        sum(out.values()).backward()
        assert set(d.tap.levels()) == {"0", "1", "2", "p6", "p7"}
        grad = student.backbone.fpn.layer_blocks[0][0].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert all(p.grad is None for p in teacher.parameters())
        ref = reference(images, targets)
        torch.testing.assert_close(out["distill"], ref["distill"])
        d.close()
        assert _all_hooks(student) == 0
    finally:
        dist.destroy_process_group()


def test_compiled_student(models) -> None:
    student, teacher = models
    reference = Distiller(copy.deepcopy(student).train(), teacher, "ssim")
    compiled = torch.compile(student.train(), backend="eager")
    try:
        d = Distiller(compiled, teacher, "ssim")
        d.method.load_state_dict(reference.method.state_dict())
        assert d.tap.model is student
        images, targets = _batch()
        out = d(images, targets)
        sum(out.values()).backward()
        levels = d.tap.levels()
        assert set(levels) == {"0", "1", "2", "p6", "p7"}
        assert all(v.requires_grad for v in levels.values())  # the compiled forward's maps
        grad = student.backbone.fpn.layer_blocks[0][0].weight.grad
        assert grad is not None and grad.abs().sum() > 0
        ref = reference(images, targets)
        torch.testing.assert_close(out["distill"], ref["distill"], rtol=1e-5, atol=1e-6)
        d.close()
        assert _all_hooks(student) == 0
    finally:
        torch._dynamo.reset()


def test_tap_on_a_compiled_module_records_closes_and_is_replaced() -> None:
    """Dynamo runs the hooks of the compiled forward, also when the model ran compiled before
    the tap existed, and notices when they are removed or replaced (a cheap module, so that
    re-tracing costs little)."""
    model = _Outputs()
    compiled = torch.compile(model, backend="eager")
    x = torch.rand(2, 3, 8, 8)
    try:
        compiled(x)  # traced without hooks
        tap = FeatureTap(compiled, "dict")
        assert tap.model is model
        compiled(x)
        got = tap.levels()
        torch.testing.assert_close(got["p4"], x[..., ::2, ::2] * 3)
        tap.close()
        tap._store = {}
        compiled(x)
        assert tap._store == {} and _all_hooks(model) == 0
        with FeatureTap(compiled, ["tuple", "list"]) as other:
            compiled(x)
            assert list(other.levels()) == ["tuple/0", "tuple/1", "list/0", "list/1"]
        assert tap._store == {}
    finally:
        torch._dynamo.reset()
