"""Shared fixtures: a tiny synthetic COCO dataset, override lists for tiny runs, a tiny teacher.

Everything here is sized for 2 CPU cores: 64 px images, 8 train / 4 val images, FPN width 16,
ResNet-18, one or two optimiser steps per run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from structkd.data import SyntheticPaths, make_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
IMAGE_SIZE = 64
NUM_TRAIN, NUM_VAL = 8, 4
NUM_CLASSES = 7  # the synthetic dataset's 6 shapes + background


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs set ``torch.set_num_threads`` (trainer.threads); do not leak it into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def coco_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    """The synthetic dataset, generated once per session (8 train / 4 val images of 64 px)."""
    root = tmp_path_factory.mktemp("coco") / "synthetic"
    return make_synthetic_coco(
        root, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE, seed=0
    )


def data_overrides(paths: SyntheticPaths) -> list[str]:
    return [
        f"data.train_ann={paths.train_ann}",
        f"data.train_images={paths.train_images}",
        f"data.val_ann={paths.val_ann}",
        f"data.val_images={paths.val_images}",
    ]


def tiny_overrides(paths: SyntheticPaths, out_dir: str | Path, *extra: str) -> list[str]:
    """``--set`` values for a tiny, deterministic CPU run writing into ``out_dir``.

    Later entries win, so ``extra`` can replace any default below.
    """
    return [
        *data_overrides(paths),
        "data.num_workers=0",
        "data.batch_size=4",
        "data.val_batch_size=4",
        "model.arch=retinanet",
        "model.backbone=resnet18",
        "model.fpn_channels=16",
        f"model.min_size={IMAGE_SIZE}",
        f"model.max_size={IMAGE_SIZE}",
        "schedule.epochs=1",
        "schedule.max_steps=2",
        "schedule.warmup_iters=2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.progress=false",
        "trainer.log_every=1",
        "trainer.threads=1",
        f"trainer.out_dir={out_dir}",
        *extra,
    ]


@pytest.fixture
def make_overrides(coco_data: SyntheticPaths) -> Callable[..., list[str]]:
    """``make_overrides(out_dir, "key=value", ...)`` -> override list for a tiny run."""

    def make(out_dir: str | Path, *extra: str) -> list[str]:
        return tiny_overrides(coco_data, out_dir, *extra)

    return make


@pytest.fixture(scope="session")
def teacher_run(coco_data: SyntheticPaths, tmp_path_factory: pytest.TempPathFactory):
    """A tiny RetinaNet (FPN 32) teacher trained for 2 steps; shared by engine and CLI tests."""
    from structkd.config import load_config
    from structkd.engine import train

    out = tmp_path_factory.mktemp("teacher") / "run"
    n = torch.get_num_threads()
    try:
        result = train(load_config(overrides=tiny_overrides(
            coco_data, out, "model.fpn_channels=32", "trainer.seed=1")))
    finally:
        torch.set_num_threads(n)
    return result


def cli_subprocess(args: list[str], *, timeout: float = 300, cwd: Path | None = None):
    """Run ``python -m structkd.cli ARGS`` in a fresh interpreter; returns CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(
        [sys.executable, "-m", "structkd.cli", *args], capture_output=True, text=True,
        timeout=timeout, env=env, cwd=cwd or REPO,
    )


def cli_inprocess(args: list[str]):
    """``structkd.cli.main(ARGS)`` in this interpreter (no start-up cost): the same exit code
    and output as :func:`cli_subprocess`, for commands that fail before any training. An
    exception that escapes ``main`` (a traceback for the user) fails the calling test."""
    import contextlib
    import io
    import logging
    import types
    import warnings

    from structkd.cli import main

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        root.handlers[:], root.level = saved
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
