"""Shared fixtures: a tiny synthetic COCO dataset, override lists for tiny runs, a tiny teacher
(helpers they use are in ``kdtest.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structkd  # noqa: F401  (before torch, as a user's program: OpenMP's wait policy)

# isort: split
import pytest
import torch

from kdtest import IMAGE_SIZE, NUM_TRAIN, NUM_VAL, tiny_overrides
from structkd.data import SyntheticPaths, make_synthetic_coco


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs set ``torch.set_num_threads`` (trainer.threads); do not leak it into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def coco_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    """The synthetic dataset, generated once per session (8 train / 4 val images of 64 px)."""
    root = tmp_path_factory.mktemp("coco") / "synthetic"
    return make_synthetic_coco(
        root, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE, seed=0
    )


@pytest.fixture
def make_overrides(coco_data: SyntheticPaths) -> Callable[..., list[str]]:
    """``make_overrides(out_dir, "key=value", ...)`` -> override list for a tiny run."""

    def make(out_dir: str | Path, *extra: str) -> list[str]:
        return tiny_overrides(coco_data, out_dir, *extra)

    return make


@pytest.fixture(scope="session")
def teacher_run(coco_data: SyntheticPaths, tmp_path_factory: pytest.TempPathFactory):
    """A tiny RetinaNet (FPN 32) teacher trained for 2 steps; shared by engine and CLI tests."""
    from structkd.recipes import load_config, run_config

    out = tmp_path_factory.mktemp("teacher") / "run"
    n = torch.get_num_threads()
    try:
        result = run_config(load_config(overrides=tiny_overrides(
            coco_data, out, "model.fpn_channels=32", "trainer.seed=1", "distill.method=none")))
    finally:
        torch.set_num_threads(n)
    return result


