"""A distillation run checks itself at the start, measures an ``auto`` weight, logs how hard
the term pulls, keeps its weight across a resume, and warns when the term goes quiet."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from kdtest import cli_inprocess
from structkd.engine import Balance, DistillWatch, RunResult
from structkd.recipes import load_config, run_config


def _cfg(make_overrides, teacher_run, out, *extra):
    return load_config(overrides=make_overrides(
        out, f"teacher.checkpoint={teacher_run.export_prefix}", "distill.method=ssim",
        "distill.weight=auto", "distill.watch_every=1", *extra))


def test_an_auto_weight_is_measured_logged_and_kept_on_resume(make_overrides, teacher_run,
                                                              tmp_path, caplog) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="structkd"):
        first = run_config(_cfg(make_overrides, teacher_run, out, "schedule.max_steps=2",
                                    "schedule.epochs=2"))
    assert "weight auto:" in caplog.text and "distillation checked on the first batch" in \
        caplog.text
    cal = first.distill["calibration"]
    assert first.distill["weight"] == pytest.approx(cal["weight"])
    assert cal["batches"] == 2  # the tiny split holds two batches
    # the step-0 ratio the module measured on its own is the calibration's on that batch
    h = first.history
    b0 = cal["per_batch"][0]
    assert h["train/grad_ratio"][0][1] == pytest.approx(
        cal["weight"] * b0["distill"] / b0["detection"], rel=1e-4)
    assert [s for s, _ in h["train/grad_ratio"]] == [0, 1]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["structkd"]["distill_weight"] == pytest.approx(cal["weight"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["distill"]["watch"]["steps"] == 2

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="structkd"):
        resumed = run_config(_cfg(make_overrides, teacher_run, out, "schedule.max_steps=3",
                                  "schedule.epochs=2",
                                  "trainer.resume=last"))
    assert "weight auto:" not in caplog.text  # never measured again on a trained student
    assert resumed.steps == 3
    assert resumed.distill["weight"] == pytest.approx(cal["weight"])
    assert RunResult.load(out).history["train/distill_weight"][-1][1] == pytest.approx(
        cal["weight"])


def test_the_adaptive_weight_moves_halfway_to_the_ratio(make_overrides, teacher_run,
                                                        tmp_path) -> None:
    result = run_config(_cfg(make_overrides, teacher_run, tmp_path / "run",
                             "schedule.max_steps=3", "schedule.epochs=2",
                             "distill.auto_every=1", "distill.auto_ratio=2"))
    h = result.history
    w = [v for _, v in h["train/distill_weight"]]
    det = [v for _, v in h["train/grad_norm_detection"]]
    dis = [v for _, v in h["train/grad_norm_distill"]]
    assert len(w) == 3
    for k in range(2):  # w_{k+1} = geometric mean of w_k and the weight giving ratio 2 at k
        target = 2.0 * det[k] / (dis[k] / w[k])
        assert w[k + 1] == pytest.approx(math.sqrt(w[k] * target), rel=1e-5)
    assert result.distill["watch"]["weight_updates"] == 3


def test_a_zero_weight_is_one_error_line(make_overrides, teacher_run, tmp_path) -> None:
    args = ["distill", "--teacher", str(teacher_run.export_prefix)]
    for o in make_overrides(tmp_path / "run", "distill.weight=0"):
        args += ["--set", o]
    r = cli_inprocess(args)
    assert r.returncode == 2
    assert "structkd: error: the method's weight is 0: the distillation term would be 0" in \
        r.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_term_that_stays_constant_is_warned_once(caplog) -> None:
    w = DistillWatch(Balance(watch_stall=3))
    with caplog.at_level(logging.WARNING, logger="structkd"):
        for step, v in enumerate([0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]):
            w._watch_stall(v, step)
    assert caplog.text.count("has stayed at 0.4 for 3 steps (step 4)") == 1
    caplog.clear()
    w = DistillWatch(Balance(watch_stall=2))
    with caplog.at_level(logging.WARNING, logger="structkd"):
        for step in range(4):
            w._watch_stall(0.0, step)
    assert "has stayed at 0 for 2 steps" in caplog.text


def test_a_ratio_outside_the_band_is_warned_on_each_excursion(caplog) -> None:
    w = DistillWatch(Balance(watch_band=[0.1, 10.0]))
    with caplog.at_level(logging.WARNING, logger="structkd"):
        for step, r in enumerate([1.0, 50.0, 60.0, 1.0, 0.01]):
            w._watch_band(r, step)
    assert caplog.text.count("swamps the detection loss") == 1
    assert caplog.text.count("hardly moves the student") == 1
    assert "at step 1 the distillation gradient's norm is 50 times" in caplog.text


def test_balance_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"watch_band=\[5, 1\]; expected \[low, high\]"):
        Balance(watch_band=[5, 1])
    with pytest.raises(ValueError, match=r"auto_batches=0; expected an int >= 1"):
        Balance(auto_batches=0)
    assert Balance(auto_every=20, watch_every=50).grad_every == 10
    assert Balance(auto_every=0, watch_every=0).grad_every == 0


def test_watching_leaves_the_run_unchanged(make_overrides, teacher_run, tmp_path) -> None:
    """Measuring the gradient norms every step trains the same weights as never measuring."""
    from safetensors.torch import load_file

    weights = []
    for every in (0, 1):
        cfg = load_config(overrides=make_overrides(
            tmp_path / f"w{every}", f"teacher.checkpoint={teacher_run.export_prefix}",
            "distill.method=mgd", f"distill.watch_every={every}"))
        r = run_config(cfg)
        weights.append(load_file(f"{r.export_prefix}.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
