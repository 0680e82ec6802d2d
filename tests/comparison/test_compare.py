"""``structkd compare`` end to end on the tiny data: paired rows, reuse and resume of an
interrupted comparison, the report, and the CLI; the table's numbers against scipy on the runs'
own ``results.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kdtest import cli_inprocess
from structkd.comparison import Comparison, compare, markdown, parse_rows
from structkd.engine import RunResult
from structkd.recipes import load_config


@pytest.fixture(scope="module")
def comparison(coco_data, teacher_run, tmp_path_factory):
    from kdtest import tiny_overrides

    out = tmp_path_factory.mktemp("cmp") / "cmp"
    cfg = load_config(overrides=tiny_overrides(coco_data, out / "unused",
                                               f"teacher.checkpoint={teacher_run.export_prefix}",
                                               "distill.watch_every=1"))
    c = compare(cfg, ["none", "ssim:2", "mse:auto"], seeds=2, out=out)
    return c, cfg, out


def test_rows_share_initial_weights_and_data_order_per_seed(comparison) -> None:
    _, _, out = comparison
    first = {}
    for seed in range(2):
        for row in ("none", "ssim_2", "mse_auto"):
            h = RunResult.load(out / f"seed{seed}" / row).history
            first[seed, row] = h["train/classification"][0][1]
    # the step-0 detection loss depends on the student's initial weights and the first batch
    # only: equal across rows of a seed, different across seeds
    for seed in range(2):
        assert first[seed, "none"] == first[seed, "ssim_2"] == first[seed, "mse_auto"]
    assert first[0, "none"] != first[1, "none"]


def test_the_table_is_computed_from_the_runs(comparison) -> None:
    _, _, out = comparison
    saved = json.loads((out / "results.json").read_text())
    ap = {(s, r): json.loads((out / f"seed{s}" / r / "results.json").read_text())["metrics"]["AP"]
          for s in range(2) for r in ("none", "ssim_2", "mse_auto")}
    rows = {r["name"]: r for r in saved["rows"]}
    assert list(rows) == ["none", "ssim_2", "mse_auto"]
    assert rows["none"]["gain"] is None
    for name in ("ssim_2", "mse_auto"):
        diffs = np.array([ap[s, name] - ap[s, "none"] for s in range(2)])
        g = rows[name]["gain"]
        assert g["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
        if diffs.std() > 0:
            ref = stats.ttest_rel([ap[s, name] for s in range(2)],
                                  [ap[s, "none"] for s in range(2)]).confidence_interval()
            assert (g["low"], g["high"]) == pytest.approx((ref.low, ref.high))
    # the auto row measured its weight in each run, and says so
    weights = rows["mse_auto"]["weights_used"]
    assert all(isinstance(w, float) and w > 0 for w in weights)
    for s in range(2):
        r = json.loads((out / f"seed{s}" / "mse_auto" / "results.json").read_text())
        assert r["distill"]["calibration"]["weight"] == pytest.approx(weights[s])
        assert r["distill"]["calibration"]["ratio"] == 5.0
    assert rows["ssim_2"]["weights_used"] == [2.0, 2.0]
    report = (out / "report.md").read_text()
    assert "| ssim_2 | 2 | 2 |" in report and "mse_auto | auto (" in report
    assert (out / "gains.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_comparison_continues(comparison) -> None:
    _, cfg, out = comparison
    run = out / "seed1" / "ssim_2"
    before = json.loads((run / "results.json").read_text())["metrics"]["AP"]
    for name in ("results.json", "student.safetensors", "student.json"):
        (run / name).unlink()
    again = compare(cfg, ["none", "ssim:2", "mse:auto"], seeds=2, out=out)
    assert again.how == {"none": ["reused", "reused"], "ssim_2": ["reused", "resumed"],
                         "mse_auto": ["reused", "reused"]}
    assert again.runs["ssim_2"][1].metrics["AP"] == before


def test_a_teacher_trained_once_and_a_budget(coco_data, tmp_path) -> None:
    from kdtest import tiny_overrides

    cfg = load_config(overrides=tiny_overrides(coco_data, tmp_path / "unused",
                                               "schedule.max_steps=1"))
    t_cfg = load_config(overrides=tiny_overrides(coco_data, tmp_path / "unused",
                                                 "model.fpn_channels=32"))
    c = compare(cfg, ["ssim"], seeds=1, out=tmp_path / "b", budget=0.5, teacher_config=t_cfg)
    assert c.how == {"none": ["trained"], "ssim": ["trained"]}
    teacher = RunResult.load(tmp_path / "b" / "teacher")
    assert c.teacher_ap == teacher.metrics["AP"]
    saved = load_config(tmp_path / "b" / "seed0" / "ssim" / "config.yaml")
    assert saved.teacher.checkpoint == str(tmp_path / "b" / "teacher" / "student")
    assert saved.data.limit_train == 4
    assert load_config(tmp_path / "b" / "teacher" / "config.yaml").data.limit_train is None
    assert c.budget == {"share": 0.5, "train_images": 4, "of": 8}
    assert "Budget: the first 4 of 8 training images (50%)" in markdown(c)
    again = compare(cfg, ["ssim"], seeds=1, out=tmp_path / "b", budget=0.5,
                    teacher_config=t_cfg)
    assert again.how == {"none": ["reused"], "ssim": ["reused"]}
    with pytest.raises(ValueError, match=r"budget=1.5; expected a share"):
        compare(cfg, ["none"], seeds=1, out=tmp_path / "c", budget=1.5)
    with pytest.raises(ValueError, match=r"no teacher is given"):
        compare(cfg, ["ssim"], seeds=1, out=tmp_path / "d")


def test_gains_and_verdicts_pair_runs_by_seed() -> None:
    """Numbers only: the gain pairs seed k of a row with seed k of none."""
    def runs(aps):
        return [RunResult(Path(f"r{i}"), {"AP": a, "AP50": a, "AP75": a, "APs": a, "APm": a,
                                          "APl": a}, None, 0.1, 1) for i, a in enumerate(aps)]

    rows = parse_rows(["ssim"])
    base, ssim = [2.0, 3.0, 4.0], [2.5, 3.6, 4.4]
    c = Comparison(rows, {"none": runs(base), "ssim": runs(ssim)}, 3, 0.95, 10.0, None,
                   Path("x"))
    g = c.gain("ssim")
    ref = stats.ttest_rel(ssim, base).confidence_interval()
    assert (g.low, g.high) == pytest.approx((ref.low, ref.high))
    assert g.verdict == "gain"
    summary = c.row_summary(rows[1])
    assert summary["gap_closed"] == pytest.approx(np.mean(np.subtract(ssim, base)) / (10 - 3))
    assert "| ssim | default | 3 |" in markdown(c)


def test_rows_are_parsed_and_bad_rows_refused() -> None:
    rows = parse_rows(["ssim", "mgd:auto", "cwd:0.5", {"name": "s4", "method": "ssim",
                                                       "weight": 4}])
    assert [r.name for r in rows] == ["none", "ssim", "mgd_auto", "cwd_0.5", "s4"]
    assert rows[2].distill["weight"] == "auto" and rows[3].distill["weight"] == 0.5
    with pytest.raises(ValueError, match=r"weight 'heavy' is neither a number nor 'auto'"):
        parse_rows(["ssim:heavy"])
    with pytest.raises(ValueError, match=r"\['ssim'\] appear twice"):
        parse_rows(["ssim", "ssim"])


def test_the_cli_compares_and_prints_the_report(coco_data, teacher_run, tmp_path) -> None:
    from kdtest import tiny_overrides

    args = ["compare", "--methods", "none", "ssim", "--seeds", "1", "--out",
            str(tmp_path / "cmp"), "--teacher", str(teacher_run.export_prefix)]
    for o in tiny_overrides(coco_data, tmp_path / "unused", "schedule.max_steps=1"):
        args += ["--set", o]
    r = cli_inprocess(args)
    assert r.returncode == 0, r.stderr
    assert "# Does distillation help on this config?" in r.stdout
    assert "1 seed: no interval" in r.stdout
    assert (tmp_path / "cmp" / "report.md").is_file()
    bad = cli_inprocess(["compare", "--methods", "ssim:heavy", "--out", str(tmp_path / "x")])
    assert bad.returncode == 2
    assert "structkd: error: method row 'ssim:heavy'" in bad.stderr
    shutil.rmtree(tmp_path / "cmp")


def test_rows_can_share_one_teacher_cache(coco_data, teacher_run, tmp_path, caplog) -> None:
    import logging

    from kdtest import tiny_overrides

    cfg = load_config(overrides=tiny_overrides(coco_data, tmp_path / "unused",
                                               "schedule.max_steps=1",
                                               f"teacher.checkpoint={teacher_run.export_prefix}"))
    with caplog.at_level(logging.INFO, logger="structkd"):
        c = compare(cfg, ["ssim", "mse"], seeds=1, out=tmp_path / "c", teacher_levels=True)
    assert "every row reads the teacher's levels from" in caplog.text
    for row in ("ssim", "mse"):
        saved = load_config(tmp_path / "c" / "seed0" / row / "config.yaml")
        assert saved.teacher.cache == str(tmp_path / "c" / "teacher_levels")
        assert saved.teacher.checkpoint is None
    assert c.how["ssim"] == ["trained"]
