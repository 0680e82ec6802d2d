"""The adapter registry: torchvision detectors pass through, a user's family can register an
adapter, and structkd works where no optional family package is installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from kdtest import SRC
from structkd.detectors import (
    Adapter,
    WrappedDetector,
    adapters,
    as_detector,
    class_count,
    detector_family,
    family_defaults,
    family_detector,
    register_adapter,
)
from structkd.models import DetectorSpec, build_detector


def test_torchvision_detectors_are_used_as_they_are() -> None:
    det = build_detector(DetectorSpec("retinanet", 3, "resnet18", fpn_channels=16))
    assert as_detector(det) is det
    assert family_defaults(det) == ("backbone", "backbone")
    assert detector_family(det) == "retinanet"
    with pytest.raises(ValueError, match=r"RetinaNet is used as it is .* the options "
                                         r"\['min_size'\] have no adapter"):
        as_detector(det, min_size=64)


class _Mine(nn.Module):
    """A detector of a user's own family (not in torchvision's calling convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, stride=8, padding=1)


class _MineWrapped(WrappedDetector):
    family, adapter, root, taps = "mine", "mine", "model", "model.body"

    def __init__(self, model: _Mine, scale: float = 1.0) -> None:
        super().__init__()
        self.model, self.scale = model, scale


def test_a_user_registers_an_adapter_for_their_family() -> None:
    register_adapter(Adapter("mine", lambda m: isinstance(m, _Mine), _MineWrapped))
    try:
        wrapped = as_detector(_Mine(), scale=2.0)
        assert isinstance(wrapped, _MineWrapped) and wrapped.scale == 2.0
        assert detector_family(wrapped) == "mine"
        assert family_defaults(wrapped) == ("model", "model.body")
        assert "mine" in [a.name for a in adapters()]
    finally:
        register_adapter(Adapter("mine", lambda m: False, _MineWrapped))


def test_structkd_works_without_the_optional_families() -> None:
    """With transformers and ultralytics unimportable, structkd imports, distils torchvision
    detectors, and a family that needs them says what to install."""
    code = f"""
import sys
sys.path.insert(0, {str(SRC)!r})

class Hide:  # as if the packages were not installed: find_spec and import both fail
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "ultralytics"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Hide())
import importlib.metadata as md
for fn in ("distribution", "version"):  # and no installed metadata either
    real = getattr(md, fn)
    def hidden(name, _real=real):
        if name.split(".")[0].lower() in ("transformers", "ultralytics"):
            raise md.PackageNotFoundError(name)
        return _real(name)
    setattr(md, fn, hidden)
import torch, structkd
from structkd.detectors import family_detector
from structkd.models import DetectorSpec, build_detector
spec = DetectorSpec("retinanet", 3, "resnet18", fpn_channels=16, min_size=64, max_size=64)
d = structkd.Distiller(build_detector(spec), build_detector(spec), "ssim").train()
out = d([torch.rand(3, 64, 64)], [{{"boxes": torch.tensor([[1., 2, 30, 40]]),
                                   "labels": torch.tensor([1])}}])
assert torch.isfinite(out["distill"])
for family in ("transformers", "ultralytics"):
    try:
        family_detector(family, "x", 3)
    except ImportError as e:
        print(family, "->", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transformers -> " in proc.stdout and "pip install" in proc.stdout
    assert "ultralytics -> " in proc.stdout and "structkd[ultralytics]" in proc.stdout
    assert torch.__version__  # the parent process is untouched


def test_remove_hooks_takes_structkd_hooks_and_leaves_the_users() -> None:
    from structkd.detectors import remove_hooks
    from structkd.distill import FeatureTap

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1))
    seen: list[int] = []
    model[0].register_forward_hook(lambda *_: seen.append(1))  # the user's
    FeatureTap(model, ["0", "1"])  # two structkd forward hooks
    assert remove_hooks(model) == 2
    model(torch.zeros(1, 3, 2, 2))
    assert seen == [1]
    model[1].register_forward_pre_hook(lambda *_: None)
    assert remove_hooks(model, structkd_only=False) == 2  # a copy to pickle: every hook goes
    assert not model[0]._forward_hooks and not model[1]._forward_pre_hooks


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_class_count_reads_torchvision_heads(arch: str) -> None:
    det = build_detector(DetectorSpec(arch, 5, "resnet18", fpn_channels=16))
    assert class_count(det) == 5
    assert class_count(nn.Conv2d(3, 3, 1)) is None  # a user's model: unknown, not a guess


def test_class_count_reads_ssd_heads() -> None:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    det = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    assert class_count(det) == 5


def test_an_unknown_builder_option_names_its_key() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=r"^model.options.num_querys: not an option of the "
                                         r"transformers builder for 'rt_detr' "):
        family_detector("transformers", "rt_detr", 7, options_key="model.options",
                        num_querys=10)
