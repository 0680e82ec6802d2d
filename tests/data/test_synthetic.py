"""Tests of the synthetic dataset generator: determinism, caching, the file lock, content."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

from structkd.data import CocoDetection, SyntheticPaths, make_synthetic_coco
from structkd.data.synthetic import BACKGROUND_SOURCES, CLASS_NAMES, _backgrounds

PARAMS = {"num_train": 4, "num_val": 24, "image_size": 256, "seed": 0}
TINY = {"num_train": 2, "num_val": 2, "image_size": 64, "seed": 0, "max_objects": 3}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return make_synthetic_coco(tmp_path_factory.mktemp("synth") / "ds", **PARAMS)


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_paths(synth: SyntheticPaths) -> None:
    assert synth.train_ann == synth.root / "train.json" and synth.val_ann == synth.root / "val.json"
    assert len(list(synth.train_images.glob("*.png"))) == PARAMS["num_train"]
    assert len(list(synth.val_images.glob("*.png"))) == PARAMS["num_val"]
    meta = json.loads((synth.root / "meta.json").read_text())
    assert meta["params"] == {**PARAMS, "max_objects": 8} and meta["classes"] == list(CLASS_NAMES)
    # no temporary or backup directories are left next to the dataset
    assert sorted(p.name for p in synth.root.parent.iterdir() if p.is_dir()) == ["ds"]


def test_deterministic(synth: SyntheticPaths, tmp_path: Path) -> None:
    again = make_synthetic_coco(tmp_path / "other", **PARAMS)
    first, second = _files(synth.root), _files(again.root)
    assert first.keys() == second.keys()
    for name, content in first.items():
        assert content == second[name], name
    for name in ("train/000001.png", "val/000024.png"):
        a = np.asarray(Image.open(synth.root / name))
        b = np.asarray(Image.open(again.root / name))
        assert a.shape == (256, 256, 3) and np.array_equal(a, b)


def test_cache_is_reused(synth: SyntheticPaths) -> None:
    watched = [synth.train_ann, synth.val_ann, synth.root / "meta.json"]
    watched.append(synth.val_images / "000001.png")
    before = [(p.stat().st_mtime_ns, p.stat().st_ino) for p in watched]
    assert make_synthetic_coco(synth.root, **PARAMS) == synth
    assert [(p.stat().st_mtime_ns, p.stat().st_ino) for p in watched] == before


def test_parameter_change_regenerates(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    paths = make_synthetic_coco(root, **TINY)
    old_json = paths.train_ann.read_bytes()
    make_synthetic_coco(root, **{**TINY, "seed": 1})
    assert json.loads((root / "meta.json").read_text())["params"]["seed"] == 1
    assert paths.train_ann.read_bytes() != old_json
    make_synthetic_coco(root, **{**TINY, "num_val": 3})
    assert len(list(paths.val_images.glob("*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ds"]


def test_overwrite_and_incomplete_dataset_regenerate(tmp_path: Path) -> None:
    paths = make_synthetic_coco(tmp_path / "ds", **TINY)
    ino = paths.train_ann.stat().st_ino
    make_synthetic_coco(tmp_path / "ds", **TINY, overwrite=True)
    assert paths.train_ann.stat().st_ino != ino
    content = paths.train_ann.read_bytes()
    (paths.train_images / "000002.png").unlink()
    make_synthetic_coco(tmp_path / "ds", **TINY)
    assert (paths.train_images / "000002.png").is_file()
    assert paths.train_ann.read_bytes() == content


def test_foreign_directory_is_not_replaced(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine exists, is not empty"):
        make_synthetic_coco(root, **TINY, overwrite=True)
    assert (root / "precious.txt").read_text() == "keep me"


def test_concurrent_callers_generate_once(tmp_path: Path, monkeypatch) -> None:
    """Two threads ask for the same dataset at once: the file lock lets one generate it while
    the other waits, then reuses it; both get the same complete dataset."""
    from structkd.data.synthetic import cache

    generated: list[Path] = []
    real_generate = cache._generate

    def slow_generate(out: Path, params: dict):
        generated.append(out)
        time.sleep(0.3)  # the other caller arrives while this one generates
        return real_generate(out, params)

    monkeypatch.setattr(cache, "_generate", slow_generate)
    start = threading.Barrier(2)
    results: list[SyntheticPaths | None] = [None, None]
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            start.wait()
            results[i] = make_synthetic_coco(tmp_path / "ds", **TINY)
        except BaseException as e:  # reported by the assertions below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(generated) == 1
    assert results[0] == results[1] == SyntheticPaths.under((tmp_path / "ds").resolve())
    paths = results[0]
    assert paths is not None
    assert len(CocoDetection(paths.train_ann, paths.train_images)) == TINY["num_train"]
    assert len(list(paths.val_images.glob("*.png"))) == TINY["num_val"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ds"]


def test_waits_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    """The lock is the file .<root name>.lock next to root: while it is held (by any process),
    make_synthetic_coco waits and writes nothing."""
    root = tmp_path / "ds"
    done = threading.Event()

    def call() -> None:
        make_synthetic_coco(root, **TINY)
        done.set()

    with FileLock(tmp_path / ".ds.lock"):
        thread = threading.Thread(target=call)
        thread.start()
        assert not done.wait(0.5)
        assert not root.exists()
        assert not [p for p in tmp_path.iterdir() if p.is_dir()]
    thread.join(timeout=120)
    assert done.is_set()
    assert (root / "meta.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_train": 0}, "num_train=0"),
        ({"image_size": 16}, "image_size=16"),
        ({"max_objects": 0}, "max_objects=0"),
        ({"seed": -1}, "seed=-1"),
        ({"max_occlusion": 1.5}, "max_occlusion=1.5"),
        ({"clutter": -1}, "clutter=-1"),
        ({"size_probs": [1.0, 0.0]}, "size_probs"),
        ({"size_probs": [0.0, 0.0, 0.0]}, "size_probs"),
    ],
)
def test_invalid_parameters(tmp_path: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make_synthetic_coco(tmp_path / "ds", **kwargs)


def test_val_split_covers_classes_and_coco_area_ranges(synth: SyntheticPaths) -> None:
    val = json.loads(synth.val_ann.read_text())
    assert [c["name"] for c in val["categories"]] == list(CLASS_NAMES)
    counts = np.bincount([a["category_id"] for a in val["annotations"]], minlength=7)[1:]
    assert (counts >= 5).all(), counts
    areas = np.array([a["area"] for a in val["annotations"]])
    small, large = (areas < 32**2).sum(), (areas > 96**2).sum()
    medium = len(areas) - small - large
    assert min(small, medium, large) >= 10, (small, medium, large)
    for a in val["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and a["area"] == w * h
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 256 and y + h <= 256


def test_loads_as_coco_detection(synth: SyntheticPaths) -> None:
    train = CocoDetection(synth.train_ann, synth.train_images)
    val = CocoDetection(synth.val_ann, synth.val_images, categories=train.coco_gt["categories"])
    assert train.num_classes == val.num_classes == len(CLASS_NAMES) + 1
    assert train.class_names[1:] == list(CLASS_NAMES)
    assert val.skipped == {"crowd": 0, "degenerate": 0, "outside": 0} and val.num_clipped == 0
    image, target = val[0]
    assert image.shape == (3, 256, 256) and 0 <= float(image.min()) <= float(image.max()) <= 1
    assert len(target["labels"]) >= 1


def test_backgrounds_load_offline() -> None:
    bgs = _backgrounds()
    assert len(bgs) == len(BACKGROUND_SOURCES)
    assert all(b.ndim == 3 and b.shape[2] == 3 and b.dtype == np.uint8 for b in bgs)


def test_difficulty_options(tmp_path: Path) -> None:
    # Defaults are not recorded (datasets made before the options existed stay valid); other
    # values are, and they change the images.
    plain = make_synthetic_coco(tmp_path / "a", **TINY, clutter=9, max_occlusion=0.7)
    meta = json.loads((plain.root / "meta.json").read_text())
    assert meta["params"] == TINY
    easy = make_synthetic_coco(tmp_path / "b", **TINY, clutter=0, max_occlusion=0.2,
                               size_probs=(0.0, 1.0, 0.0))
    meta = json.loads((easy.root / "meta.json").read_text())
    assert meta["params"] == {**TINY, "clutter": 0, "max_occlusion": 0.2,
                              "size_probs": [0.0, 1.0, 0.0]}
    assert _files(plain.train_images) != _files(easy.train_images)
    # Medium objects only: every box is 35-48 px (the 64 px image caps the stratum at 48).
    for a in json.loads(easy.val_ann.read_text())["annotations"] + json.loads(
        easy.train_ann.read_text()
    )["annotations"]:
        assert a["area"] >= 20**2, a
    # Only the large stratum weighted, but it does not fit a 64 px image.
    with pytest.raises(ValueError, match="no size stratum"):
        make_synthetic_coco(tmp_path / "c", **TINY, size_probs=(0.0, 0.0, 1.0))
