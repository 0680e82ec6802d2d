"""``structkd compare`` keeps what it is given and what it made: rows train with the config's
distill keys (checked on what the built method recorded), a teacher replaced at the same path
is never reused (checked against hashlib on its files), and a changed config never replaces
an earlier comparison (its files stay byte for byte)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdtest import cli_inprocess, tiny_overrides
from structkd.comparison import compare, parse_rows, resolve_row, row_config
from structkd.config import ConfigError
from structkd.recipes import load_config


def _tiny(coco_data, tmp_path: Path, *extra: str):
    return load_config(overrides=tiny_overrides(coco_data, tmp_path / "unused",
                                                "schedule.max_steps=1", *extra))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (lock files aside), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".structkd.lock"}


def test_rows_train_with_the_configs_distill_keys(coco_data, teacher_run, tmp_path) -> None:
    cfg = _tiny(coco_data, tmp_path, f"teacher.checkpoint={teacher_run.export_prefix}",
                "distill.options.window_size=7", "distill.weight=5")
    rows = ["none", "ssim", "ssim:3", {"name": "own", "method": "ssim",
                                       "options": {"window_size": 5}}]
    c = compare(cfg, rows, seeds=1, out=tmp_path / "c")
    expected = {"ssim": (5.0, {"window_size": 7}), "ssim_3": (3.0, {"window_size": 7}),
                "own": (5.0, {"window_size": 5})}
    for name, (weight, options) in expected.items():
        run = json.loads((tmp_path / "c" / "seed0" / name / "results.json").read_text())
        # what the built method recorded: its weight and the Distiller's options
        assert run["method"]["weight"] == weight
        assert {k: v for k, v in run["method"]["options"].items() if k != "weight"} == options
        saved = load_config(tmp_path / "c" / "seed0" / name / "config.yaml").distill
        assert (saved.weight, saved.options) == (weight, options)
    none = load_config(tmp_path / "c" / "seed0" / "none" / "config.yaml").distill
    assert (none.method, none.weight, none.options) == ("none", None, {})
    saved = {r["name"]: r["distill"] for r in
             json.loads((tmp_path / "c" / "results.json").read_text())["rows"]}
    assert saved["ssim"] == {"method": "ssim", "weight": 5.0, "options": {"window_size": 7}}
    assert "| ssim | 5 | 1 |" in (tmp_path / "c" / "report.md").read_text()
    assert c.runs["ssim_3"][0].distill["weight"] == 3.0


def test_a_row_of_another_method_refuses_the_configs_weight_and_options(coco_data,
                                                                        teacher_run,
                                                                        tmp_path) -> None:
    """Checked before any training: nothing is written."""
    cfg = _tiny(coco_data, tmp_path, f"teacher.checkpoint={teacher_run.export_prefix}",
                "distill.options.window_size=7", "distill.weight=5")
    with pytest.raises(ConfigError, match=r"method row 'pkd': distill.weight=5.0 is the "
                       r"config's weight for method 'ssim'.*'pkd:default'"):
        compare(cfg, ["none", "ssim", "pkd"], seeds=1, out=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"method row 'pkd_default': the config's "
                       r"distill.options \{'window_size': 7\}.*not accepted by method 'pkd'.*"
                       r"a mapping row"):
        compare(cfg, ["none", "pkd:default"], seeds=1, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    own = resolve_row(cfg, parse_rows([{"name": "p", "method": "pkd", "weight": None,
                                        "options": {}}])[1])
    assert own.distill == {"method": "pkd", "weight": None, "options": {}}
    # what every method takes carries over: an auto weight and an option pkd accepts
    shared = _tiny(coco_data, tmp_path, f"teacher.checkpoint={teacher_run.export_prefix}",
                   "distill.weight=auto", "distill.options.adapter=conv1x1")
    pkd = row_config(shared, parse_rows(["pkd"])[1], 0, tmp_path / "p").distill
    assert (pkd.method, pkd.weight, pkd.options) == ("pkd", "auto", {"adapter": "conv1x1"})
    bad = cli_inprocess(["compare", "--methods", "none", "pkd", "--out", str(tmp_path / "x"),
                         "--teacher", str(teacher_run.export_prefix), "--set",
                         "distill.weight=5"])
    assert bad.returncode == 2
    assert "structkd: error: method row 'pkd': distill.weight=5.0" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_a_replaced_teacher_file_is_never_reused(coco_data, teacher_run, tmp_path,
                                                 caplog) -> None:
    teacher = tmp_path / "t" / "student"
    teacher.parent.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(teacher_run.export_prefix.with_name("student" + suffix),
                    teacher.with_name("student" + suffix))
    cfg = _tiny(coco_data, tmp_path, f"teacher.checkpoint={teacher}")
    out = tmp_path / "c"
    first = compare(cfg, ["ssim"], seeds=1, out=out)
    assert first.how == {"none": ["trained"], "ssim": ["trained"]}
    record = json.loads((out / "seed0" / "ssim" / "teacher_files.json").read_text())["files"]
    weights = load_file(teacher.with_suffix(".safetensors"))
    by_hand = hashlib.sha256()  # the weights file by its tensors, in name order
    for k in sorted(weights):
        by_hand.update(f"{k}:{tuple(weights[k].shape)}:{weights[k].dtype}".encode())
        by_hand.update(weights[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    json_file = teacher.with_suffix(".json")
    assert record == {str(json_file): hashlib.sha256(json_file.read_bytes()).hexdigest()[:16],
                      str(teacher.with_suffix(".safetensors")): by_hand.hexdigest()[:16]}
    original = teacher.with_suffix(".safetensors").read_bytes()
    # the same weights saved again (safetensors orders its header as it likes): the same teacher
    save_file(weights, teacher.with_suffix(".safetensors"), metadata={"b": "2", "a": "1"})
    assert compare(cfg, ["ssim"], seeds=1, out=out).how == {"none": ["reused"],
                                                            "ssim": ["reused"]}
    kept = _snapshot(out)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 0.5  # another teacher, same path, same config
    save_file(weights, teacher.with_suffix(".safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="structkd.comparison"):
        again = compare(cfg, ["ssim"], seeds=1, out=out)
    assert again.out == tmp_path / "c-2"
    assert again.how == {"none": ["trained"], "ssim": ["trained"]}
    assert "seed0/ssim: its teacher changed since it was distilled (student.safetensors:" \
        in caplog.text
    assert _snapshot(out) == kept  # the first comparison, byte for byte
    assert compare(cfg, ["ssim"], seeds=1, out=out).how == {"none": ["reused"],
                                                            "ssim": ["reused"]}
    teacher.with_suffix(".safetensors").write_bytes(original)
    back = compare(cfg, ["ssim"], seeds=1, out=out)
    assert back.out == out and back.how == {"none": ["reused"], "ssim": ["reused"]}


def test_a_changed_config_never_replaces_an_earlier_comparison(coco_data, tmp_path,
                                                               caplog) -> None:
    out = tmp_path / "c"
    cfg = _tiny(coco_data, tmp_path)
    changed = _tiny(coco_data, tmp_path, "optim.lr=0.001")
    assert compare(cfg, ["none"], seeds=1, out=out).how == {"none": ["trained"]}
    kept = _snapshot(out)
    with caplog.at_level(logging.WARNING, logger="structkd.comparison"):
        c = compare(changed, ["none"], seeds=1, out=out)
    assert (c.out, c.how) == (tmp_path / "c-2", {"none": ["trained"]})
    assert "seed0/none: its config differs: optim.lr 0.01 -> 0.001" in caplog.text
    assert _snapshot(out) == kept
    assert json.loads((tmp_path / "c-2" / "results.json").read_text())["rows"][0]["runs"] == \
        [str(tmp_path / "c-2" / "seed0" / "none")]
    # each comparison continues where it lives
    assert compare(cfg, ["none"], seeds=1, out=out).how == {"none": ["reused"]}
    again = compare(changed, ["none"], seeds=1, out=out)
    assert (again.out, again.how) == (tmp_path / "c-2", {"none": ["reused"]})
