"""Shared test helpers: sizes of the tiny generated dataset, ``--set`` lists for tiny runs,
and the CLI run in a subprocess or in-process. (Fixtures are in ``conftest.py``.)

Everything here is sized for 2 CPU cores: 64 px images, 8 train / 4 val images, FPN width 16,
ResNet-18, one or two optimiser steps per run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from structkd.data import SyntheticPaths

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
IMAGE_SIZE = 64
NUM_TRAIN, NUM_VAL = 8, 4
NUM_CLASSES = 7  # the synthetic dataset's 6 shapes + background


def data_overrides(paths: SyntheticPaths) -> list[str]:
    return [
        f"data.train_ann={paths.train_ann}",
        f"data.train_images={paths.train_images}",
        f"data.val_ann={paths.val_ann}",
        f"data.val_images={paths.val_images}",
    ]


def tiny_overrides(paths: SyntheticPaths, out_dir: str | Path, *extra: str) -> list[str]:
    """``--set`` values for a tiny, deterministic CPU run writing into ``out_dir``.

    Later entries win, so ``extra`` can replace any default below. With a ``model.family``
    other than torchvision in ``extra``, the torchvision model keys are left out (such a model
    refuses them).
    """
    family = any(e.startswith("model.family=") and e != "model.family=torchvision"
                 for e in extra)
    torchvision = [] if family else ["model.arch=retinanet", "model.backbone=resnet18",
                                     "model.fpn_channels=16"]
    return [
        *data_overrides(paths),
        "data.num_workers=0",
        "data.batch_size=4",
        "data.val_batch_size=4",
        *torchvision,
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


def distill_config(paths: SyntheticPaths, teacher_run, out_dir: str | Path, *extra: str):
    """A tiny SSIM distillation config from ``teacher_run``'s export, writing into
    ``out_dir / "run"`` (the teacher-cache tests' setting)."""
    from structkd.recipes import load_config

    return load_config(overrides=tiny_overrides(
        paths, Path(out_dir) / "run", f"teacher.checkpoint={teacher_run.export_prefix}",
        "distill.method=ssim", *extra))


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


def train(cfg):
    """What ``structkd train`` does with a config: a plain run (``distill.method=none``)."""
    from structkd.recipes import run_config

    cfg.distill.method = "none"
    return run_config(cfg)


def distill(cfg):
    """What ``structkd distill`` does with a config: distil (SSIM unless a method is named)."""
    from structkd.recipes import run_config

    if cfg.distill.method is None:
        cfg.distill.method = "ssim"
    return run_config(cfg)


def tiny_retinanet(fpn: int, num_classes: int = 3, size: int = IMAGE_SIZE):
    """A RetinaNet ResNet-18 with random weights for ``size`` px inputs (distill unit tests)."""
    from structkd.models import build_detector

    return build_detector(arch="retinanet", num_classes=num_classes, backbone="resnet18",
                          fpn_channels=fpn, min_size=size, max_size=size)


def det_batch(seed: int = 0, size: int = IMAGE_SIZE):
    """Two random images with one box each, in torchvision's (images, targets) form."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    return images, targets


def assert_same_detections(ref: dict, got: dict, *, box_atol: float, score_atol: float) -> None:
    """``got`` holds the detections of ``ref`` (same count), each matched one-to-one to a
    detection of the same label whose score and box agree within the tolerances. Order is not
    compared: two runtimes may order detections of near-equal scores differently."""
    import numpy as np

    rb, rs, rl = (np.asarray(ref[k], dtype=np.float64) for k in ("boxes", "scores", "labels"))
    gb, gs, gl = (np.asarray(got[k], dtype=np.float64) for k in ("boxes", "scores", "labels"))
    assert len(gs) == len(rs), f"{len(gs)} detections, expected {len(rs)}"
    free = np.ones(len(rs), dtype=bool)
    for j in np.argsort(-gs, kind="stable"):
        cost = np.abs(rb - gb[j]).max(1) if len(rb) else np.zeros(0)
        ok = free & (rl == gl[j]) & (np.abs(rs - gs[j]) <= score_atol) & (cost <= box_atol)
        assert ok.any(), (f"detection {j} (label {gl[j]:.0f}, score {gs[j]:.6f}, box "
                          f"{gb[j].round(3).tolist()}) has no match in the reference")
        i = np.flatnonzero(ok)[np.argmin(cost[ok])]
        free[i] = False


def slow_except(values, *fast):
    """The parameters of a test repeated over every method or model type: those in ``fast``
    run in the fast suite, the others (the same check on another method) with the slow tests
    (``pytest -m slow``, or the whole suite)."""
    missing = [f for f in fast if f not in values]
    assert not missing, f"{missing} are not among {values}"
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]
