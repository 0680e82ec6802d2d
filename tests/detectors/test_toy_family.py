"""A detector family is one file: a toy family defined here and registered through the public
API alone (``structkd.detectors.register_adapter``) trains, distils from a torchvision teacher,
evaluates and exports to ONNX, with nothing in structkd asking which family it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import structkd
from kdtest import IMAGE_SIZE, NUM_CLASSES, tiny_retinanet
from structkd.data import CocoDetection, build_transforms
from structkd.detectors import (
    Adapter,
    WrappedDetector,
    as_detector,
    detector_family,
    protocol_of,
    register_adapter,
)


class ToyNet(nn.Module):
    """The toy family's own model: two stride-8 / stride-16 maps and a class map."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.cls = nn.Conv2d(16, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(F.relu(self.down(F.relu(self.stem(x)))))


class ToyDetector(WrappedDetector):
    """The toy family in structkd's protocol: the whole adapter."""

    family, adapter, root = "toy", "toy", "model"

    def __init__(self, model: ToyNet, size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.model = model
        self.transform = GeneralizedRCNNTransform(size, size, [0.5] * 3, [0.25] * 3,
                                                  size_divisible=32)
        self.taps = ["model.stem", "model.down"]

    @property
    def num_classes(self) -> int:
        return self.model.cls.out_channels + 1

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        batch, targets, original = self.batched(images, targets)
        scores = self.model(batch.tensors).mean(dim=(-2, -1))  # (B, K): one guess per image
        if self.training:
            assert targets is not None
            wanted = torch.zeros_like(scores)
            for i, t in enumerate(targets):
                wanted[i, self.class_ids(t, "classes")] = 1.0
            return {"classification": F.binary_cross_entropy_with_logits(scores, wanted)}
        out = []
        for s, (h, w) in zip(scores.sigmoid(), original, strict=True):
            score, label = s.max(dim=0)
            box = torch.stack([s.new_zeros(()), s.new_zeros(()), s.new_tensor(float(w)),
                               s.new_tensor(float(h))])
            out.append({"boxes": box[None], "scores": score[None], "labels": label[None] + 1})
        return out


@pytest.fixture(scope="module")
def toy_family():
    adapter = register_adapter(Adapter("toy", accepts=lambda m: isinstance(m, ToyNet),
                                       wrap=ToyDetector))
    yield adapter
    from structkd.detectors import registry  # the test's own family leaves no trace

    registry._ADAPTERS.remove(adapter)


@pytest.fixture(scope="module")
def datasets(coco_data):
    return (CocoDetection(coco_data.train_ann, coco_data.train_images, build_transforms(True)),
            CocoDetection(coco_data.val_ann, coco_data.val_images, build_transforms(False)))


def test_a_family_registered_from_one_file_trains_distils_evaluates_exports(
        toy_family, datasets, tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = ToyNet(NUM_CLASSES - 1)
    wrapped = as_detector(student)
    assert isinstance(wrapped, ToyDetector) and detector_family(wrapped) == "toy"
    view = protocol_of(wrapped)
    assert (view.root, view.taps, view.num_classes) == ("model", ["model.stem", "model.down"],
                                                        NUM_CLASSES)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    tiny = {"epochs": 1, "max_steps": 2, "batch_size": 4, "num_workers": 0, "progress": False,
            "threads": 1, "warmup_iters": 1}
    result = structkd.fit(wrapped, *datasets, teacher=tiny_retinanet(16, NUM_CLASSES),
                          method="mse", out_dir=tmp_path / "run", **tiny)
    assert result.steps == 2 and result.method["name"] == "mse"
    assert 0 <= result.metrics["AP"] <= 100  # evaluated by structkd's COCO evaluation
    # the teacher's strides 8 and 16 paired with the toy's two taps, and the student trained
    assert result.distill["start_check"]["levels"] == ["s8", "s16"]
    assert any(not torch.equal(v, before[k]) for k, v in wrapped.state_dict().items())

    from structkd.models.onnx import OnnxDetector, export_onnx

    path = export_onnx(wrapped.eval(), tmp_path / "toy.onnx")
    assert path.is_file()
    image = datasets[1][0][0]
    with torch.no_grad():
        ref = wrapped([image])[0]
    got = OnnxDetector(path)([image])[0]
    np.testing.assert_allclose(np.asarray(got["scores"]), ref["scores"].numpy(), atol=1e-5)
    assert np.asarray(got["labels"]).tolist() == ref["labels"].tolist()
