"""Config keys as command-line flags (``--optim.lr 0.02``): parsed by the key's type, layered
over the file and ``--set``, and the commands' own flags set keys as values, not as text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kdtest import cli_inprocess
from structkd.cli import split_key_flags
from structkd.config import ConfigError, parse_flags
from structkd.recipes import load_config, teacher_fields
from structkd.recipes.schema import RENAMED, Config


def _printed_config(args: list[str]) -> dict:
    proc = cli_inprocess(["config", *args])
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_split_key_flags_takes_dotted_flags_and_their_values() -> None:
    rest, keys = split_key_flags(["distill", "-c", "x.yaml", "--optim.lr", "-0.5", "--teacher",
                                  "t", "--schedule.epochs=3", "--set", "a.b=1"])
    assert rest == ["distill", "-c", "x.yaml", "--teacher", "t", "--set", "a.b=1"]
    assert keys == ["--optim.lr", "-0.5", "--schedule.epochs=3"]


def test_key_flags_set_the_keys_by_their_types() -> None:
    cfg = _printed_config(["--optim.lr", "0.05", "--schedule.epochs=3", "--trainer.devices",
                           "2", "--distill.options.window_size", "7", "--data.synthetic.seed",
                           "4", "--teacher.cache_dtype", "int8"])
    assert cfg["optim"]["lr"] == 0.05 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["schedule"]["epochs"] == 3
    assert cfg["trainer"]["devices"] == 2
    assert cfg["distill"]["options"] == {"window_size": 7}
    assert cfg["data"]["synthetic"]["seed"] == 4
    assert cfg["teacher"]["cache_dtype"] == "int8"
    # everything else is the schema's default, as load_config gives it
    expected = load_config(None).to_dict()
    for section in ("model", "teacher"):
        assert {k: v for k, v in cfg[section].items() if k != "cache_dtype"} == {
            k: v for k, v in expected[section].items() if k != "cache_dtype"}


def test_layers_file_then_set_then_key_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n  momentum: 0.8\nschedule:\n  epochs: 5\n")
    cfg = _printed_config(["-c", str(path), "--set", "optim.lr=0.2", "--set",
                           "schedule.epochs=6", "--optim.lr", "0.3"])
    assert (cfg["optim"]["lr"], cfg["optim"]["momentum"], cfg["schedule"]["epochs"]) == (
        0.3, 0.8, 6)


@pytest.mark.parametrize(("argv", "names"), [
    (["--optim.lr", "abc"], ["--optim.lr='abc': expected float"]),
    (["--teacher.cache_dtype", "int4"], ["--teacher.cache_dtype='int4'", "int8"]),
    (["--trainer.max_epochs", "3"], ["--trainer.max_epochs: unknown config key",
                                     "'divergence_factor'"]),
    # a renamed key is named, never taken as a prefix of its new name (argparse abbreviations)
    (["--data.hflip", "0.5"], ["'data.hflip' is now 'data.hflip_prob'"]),
    (["--optim.weight", "0.5"], ["unknown config key 'optim.weight'", "'weight_decay'"]),
])
def test_a_bad_key_flag_is_one_line_naming_it(argv: list[str], names: list[str]) -> None:
    proc = cli_inprocess(["config", *argv])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("structkd: error:"))
    for name in names:
        assert name in line, line


def test_parse_flags_gives_only_the_keys_given() -> None:
    assert parse_flags(Config, ["--optim.lr", "0.5", "--distill.method=mgd"]) == {
        "optim": {"lr": 0.5}, "distill": {"method": "mgd"}}
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_flags(Config, ["stray"], renamed=RENAMED)


def test_a_command_without_a_config_refuses_key_flags(capsys) -> None:
    from structkd.cli import main

    with pytest.raises(SystemExit) as e:
        main(["methods", "--optim.lr", "1"])
    assert e.value.code == 2
    assert "structkd methods takes no config keys" in capsys.readouterr().err


def test_teacher_flag_is_a_value_not_yaml_text(tmp_path: Path, monkeypatch) -> None:
    """A saved teacher whose prefix reads as YAML (``2024``, ``yes``): the old text round trip
    (``teacher.checkpoint=2024``) turned it into a number or a boolean."""
    monkeypatch.chdir(tmp_path)
    for prefix in ("2024", "yes"):
        (tmp_path / f"{prefix}.json").write_text("{}")
        (tmp_path / f"{prefix}.safetensors").write_bytes(b"")
        fields = teacher_fields(prefix)
        assert fields == {"checkpoint": prefix}
        assert load_config(None, [{"teacher": fields}]).teacher.checkpoint == prefix
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint=2024"):
        load_config(None, ["teacher.checkpoint=2024"])  # what the text form made of it
    assert os.getcwd() == str(tmp_path)


def test_teacher_fields_by_kind(tmp_path: Path) -> None:
    assert teacher_fields("retinanet_resnet50_fpn_v2", "W.COCO_V1") == {
        "torchvision": "retinanet_resnet50_fpn_v2", "weights": "W.COCO_V1"}
    assert teacher_fields(str(tmp_path / "run" / "last.ckpt")) == {
        "checkpoint": str(tmp_path / "run" / "last.ckpt")}  # read (or reported missing) later
    with pytest.raises(ValueError, match="--teacher: 'retinanet' is one of structkd's own"):
        teacher_fields("retinanet", flag="--teacher")
