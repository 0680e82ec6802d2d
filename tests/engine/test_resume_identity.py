"""The training data in a run's identity, read from the dataset object: a Python ``fit`` run
resumes only onto the data it trained on, and a resume onto the same data ends exactly like
the uninterrupted run."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, Subset

import structkd
from kdtest import IMAGE_SIZE
from structkd.data import CocoDetection, build_transforms
from structkd.engine.runs.resume import data_identity
from structkd.models import build_detector

TINY = {"batch_size": 4, "num_workers": 0, "progress": False, "threads": 1,
        "warmup_iters": 1, "max_steps": None}


@pytest.fixture(scope="module")
def datasets(coco_data):
    return (CocoDetection(coco_data.train_ann, coco_data.train_images, build_transforms(True)),
            CocoDetection(coco_data.val_ann, coco_data.val_images, build_transforms(False)))


class _Listed(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        raise NotImplementedError


def test_data_identity(datasets, coco_data) -> None:
    train, _ = datasets
    digest = hashlib.sha256(Path(coco_data.train_ann).read_bytes()).hexdigest()[:16]
    assert data_identity(train) == {"train_ann": digest,
                                    "train_images": str(Path(coco_data.train_images).resolve()),
                                    "images": 8}
    first, again = data_identity(Subset(train, [0, 1, 2])), data_identity(Subset(train, [0, 1, 2]))
    assert first == again and first["images"] == 3 and first["train_ann"] == digest
    assert data_identity(Subset(train, [0, 1, 3]))["subsets"] != first["subsets"]
    assert data_identity(Subset(Subset(train, [0, 1, 2]), [0]))["subsets"][1] == \
        first["subsets"][0]  # the outer subset first
    assert data_identity(_Listed(5)) == {"dataset": f"{__name__}._Listed", "images": 5}


def _student():
    torch.manual_seed(0)
    return build_detector(arch="retinanet", num_classes=7, backbone="resnet18", fpn_channels=16,
                          min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)


def test_fit_resumes_only_onto_its_data(datasets, tmp_path) -> None:
    """``fit`` on a ``Subset``: 2 epochs uninterrupted equal 1 epoch + a resume with the same
    subset (another ``Subset`` object); a resume with other images is refused naming ``data``."""
    train, val = datasets
    full = structkd.fit(_student(), Subset(train, range(6)), val, epochs=2,
                        out_dir=tmp_path / "full", **TINY)
    part = tmp_path / "part"
    structkd.fit(_student(), Subset(train, range(6)), val, epochs=1, out_dir=part, **TINY)
    with pytest.raises(ValueError, match=r'another run; data: checkpoint \{.*"subsets": '
                                         r'\["[0-9a-f]{16}"\]\} vs now \{.*"subsets"') as e:
        structkd.fit(_student(), Subset(train, range(2, 8)), val, epochs=2, out_dir=part,
                     resume="last", **TINY)
    then, now = re.findall(r'"subsets": \["([0-9a-f]{16})"\]', str(e.value))
    assert then != now
    resumed = structkd.fit(_student(), Subset(train, range(6)), val, epochs=2, out_dir=part,
                           resume="last", **TINY)
    assert resumed.steps == full.steps == 4
    a, b = (load_file(str(d / "student.safetensors")) for d in (tmp_path / "full", part))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
