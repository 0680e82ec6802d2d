"""The experiment config (``structkd.recipes.load_config``): defaults derived from the API, YAML
+ ``--set`` overrides, strict keys and types, value checks by the API types, presets, LR."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from pathlib import Path

import pytest
import yaml
from torch import nn

from structkd.config import ConfigError, parse_override
from structkd.engine import Loader, Schedule
from structkd.engine.options import SCHEDULE_PRESETS
from structkd.recipes import Config, load_config
from structkd.recipes.schema import DataSection

SECTIONS = ["data", "model", "teacher", "distill", "optim", "schedule", "trainer"]


def test_defaults_load() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert list(cfg.to_dict()) == SECTIONS
    assert cfg.model.arch == "retinanet" and cfg.model.backbone == "resnet18"
    assert cfg.distill.method is None and cfg.distill.weight is None  # auto: ssim with a teacher
    assert cfg.distill.levels is None and cfg.distill.options == {}
    assert cfg.teacher.checkpoint is None and cfg.teacher.strict_classes is True
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.01
    assert cfg.schedule.epochs == 12 and cfg.schedule.milestones == [8, 11]
    assert cfg.schedule.preset is None
    assert cfg.data.train_ann is None and tuple(cfg.data.scale_range) == (1.0, 1.0)
    assert cfg.data.synthetic.num_train == 512 and cfg.data.hflip_prob == 0.5
    # Fresh objects each time: mutable defaults are not shared between configs.
    other = load_config()
    other.schedule.milestones.append(99)
    assert cfg.schedule.milestones == [8, 11]


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"arch": "fcos", "fpn_channels": 64},
        "optim": {"lr": 0.05, "name": "adamw"},
        "distill": {"method": "ssim", "levels": ["s32"]},
        "teacher": {"checkpoint": "runs/teacher/student"},
    }))
    cfg = load_config(path, [
        "optim.lr=0.02",
        "distill.levels=[s8,s16]",
        "teacher.checkpoint=null",
        "data.scale_range=[0.5, 1]",
        "data.synthetic.max_objects=3",
        "trainer.progress=false",
        "distill.options={window_size: 7, sigma: 1.0}",
        "schedule.max_steps=3",
    ])
    # YAML values survive where not overridden...
    assert cfg.model.arch == "fcos" and cfg.model.fpn_channels == 64
    assert cfg.optim.name == "adamw" and cfg.distill.method == "ssim"
    # ...and overrides win, with YAML-typed values.
    assert cfg.optim.lr == 0.02 and isinstance(cfg.optim.lr, float)
    assert cfg.distill.levels == ["s8", "s16"]
    assert cfg.teacher.checkpoint is None
    assert tuple(cfg.data.scale_range) == (0.5, 1.0) and all(
        isinstance(v, float) for v in cfg.data.scale_range)
    assert cfg.data.synthetic.max_objects == 3
    assert cfg.trainer.progress is False
    assert cfg.distill.options == {"window_size": 7, "sigma": 1.0}
    assert cfg.schedule.max_steps == 3
    # Untouched keys keep their defaults.
    assert cfg.optim.momentum == 0.9 and cfg.model.backbone == "resnet18"


def test_int_promoted_to_float_and_later_override_wins() -> None:
    cfg = load_config(overrides=["optim.lr=1", "optim.lr=0.5", "distill.weight=4"])
    assert cfg.optim.lr == 0.5
    assert cfg.distill.weight == 4.0 and isinstance(cfg.distill.weight, float)


def test_scientific_notation_float() -> None:
    """PyYAML (YAML 1.1) reads '1e-3' as a string; float keys must still accept it."""
    assert load_config(overrides=["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)
    assert load_config(overrides=["optim.lr=5E-4"]).optim.lr == pytest.approx(5e-4)
    assert load_config(base={"optim": {"weight_decay": "1e-4"}}).optim.weight_decay == 1e-4
    with pytest.raises(ValueError, match=r"optim\.lr='fast': expected float"):
        load_config(overrides=["optim.lr=fast"])
    with pytest.raises(ValueError, match=r"optim\.lr='nan': expected float"):
        load_config(overrides=["optim.lr=nan"])
    with pytest.raises(ValueError, match=r"optim\.lr=nan; expected a finite number > 0"):
        load_config(overrides=["optim.lr=.nan"])  # YAML's NaN is a float: the value check


def test_yaml_resolved_config_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(overrides=["schedule.preset=2x", "distill.levels=[s8]", "optim.lr=0.03"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg


def test_parse_override() -> None:
    assert parse_override("a.b.c=[1, 2]") == ("a.b.c", [1, 2])
    assert parse_override("a=") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")
    with pytest.raises(ValueError, match=r"section\.key=value"):
        parse_override("optim.lr")
    with pytest.raises(ValueError, match="empty key"):
        parse_override("=3")
    with pytest.raises(ValueError, match="cannot parse value"):
        parse_override("optim.lr=[1, 2")


@pytest.mark.parametrize(("override", "key", "valid"), [
    ("optimm.lr=0.1", "optimm", SECTIONS),
    ("optim.lrr=0.1", "optim.lrr", [f.name for f in dataclasses.fields(Config().optim)]),
    ("data.bach_size=2", "data.bach_size", [f.name for f in dataclasses.fields(DataSection)]),
    ("data.synthetic.num_trian=2", "data.synthetic.num_trian",
     ["num_train", "num_val", "image_size", "max_objects", "clutter"]),
])
def test_unknown_keys_name_key_and_list_valid(override: str, key: str, valid: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        load_config(overrides=[override])
    msg = str(info.value)
    assert f"'{key}'" in msg
    for name in valid:
        assert name in msg


def test_unknown_key_in_yaml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: fcos\n  fpn_chanels: 64\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "'model.fpn_chanels'" in msg and "fpn_channels" in msg


def test_missing_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize(("override", "fragments"), [
    ("optim.lr=fast", ["optim.lr", "'fast'", "float"]),
    ("schedule.epochs=2.5", ["schedule.epochs", "2.5", "int"]),
    ("trainer.progress=1", ["trainer.progress", "1", "bool"]),
    ("distill.weight=true", ["distill.weight", "True", "float"]),
    ("data.scale_range=0.5", ["data.scale_range", "0.5", "list"]),
    ("distill.levels=[s8, 16]", ["distill.levels", "16", "list of str"]),
    ("model.weights=3", ["model.weights", "3", "str"]),
    ("distill.options=3", ["distill.options", "3", "mapping"]),
    ("optim=3", ["optim", "3", "mapping"]),
])
def test_wrong_types_name_key_and_value(override: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        load_config(overrides=[override])
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(("override", "fragment"), [
    ("schedule.epochs=0", "schedule.epochs=0"),
    ("optim.name=rmsprop", "optim.name='rmsprop'"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.scale_range=[1.2, 0.8]", "data.scale_range"),
    ("data.scale_range=[1.0]", "data.scale_range"),
    ("schedule.preset=3x", "schedule.preset='3x'"),
    ("distill.teacher_dtype=half", "distill.teacher_dtype='half': expected one of"),
    ("model.arch=yolo", "model.arch='yolo' is not supported"),
    ("model.fpn_channels=0", "model.fpn_channels=0 is invalid"),
    ("data.synthetic.num_train=0", "data.synthetic.num_train=0; expected an integer"),
    ("distill.method=cosine", "distill.method='cosine': method='cosine' is unknown"),
    ("distill.options.windw_size=3", "distill.options (method 'ssim'): option(s) ['windw_size']"),
    ("distill.options.weight=3", "distill.options.weight: set distill.weight instead"),
])
def test_invalid_values(override: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        load_config(overrides=[override])
    assert fragment in str(info.value)


@pytest.mark.parametrize(("preset", "epochs", "milestones"), [
    ("1x", 12, [8, 11]), ("2x", 24, [16, 22]),
])
def test_presets(preset: str, epochs: int, milestones: list[int]) -> None:
    cfg = load_config(overrides=[f"schedule.preset={preset}", "schedule.milestones=[1]"])
    assert (cfg.schedule.epochs, cfg.schedule.milestones) == (epochs, milestones)
    assert SCHEDULE_PRESETS[preset] == (epochs, tuple(milestones))
    # The preset's milestone list is a copy: mutating it must not change the preset.
    cfg.schedule.milestones.append(100)
    assert list(SCHEDULE_PRESETS[preset][1]) == milestones


def test_lr_factor_warmup_and_steps() -> None:
    s = Schedule(warmup_iters=10, warmup_ratio=0.1, milestones=[2, 3], gamma=0.1)

    def lr_factor(step: int, steps_per_epoch: float, schedule: Schedule) -> float:
        return schedule.factor(step, steps_per_epoch)

    spe = 5.0  # steps per epoch
    assert lr_factor(0, spe, s) == pytest.approx(0.1)
    assert lr_factor(4, spe, s) == pytest.approx(0.1 + 0.9 * 0.4)
    assert lr_factor(5, spe, s) == pytest.approx(0.55)  # epoch 1, still warming up
    assert lr_factor(9, spe, s) == pytest.approx(0.91)
    assert lr_factor(10, spe, s) == pytest.approx(0.1)  # warm-up done, epoch 2: first drop
    assert lr_factor(14, spe, s) == pytest.approx(0.1)
    assert lr_factor(15, spe, s) == pytest.approx(0.01)  # epoch 3: second drop
    assert lr_factor(1000, spe, s) == pytest.approx(0.01)
    # Warm-up is monotonic and continuous into the plateau.
    values = [lr_factor(i, 100.0, s) for i in range(12)]
    assert values == sorted(values) and values[-1] == 1.0
    # Unknown epoch length (before Lightning knows the loader): no decay.
    assert lr_factor(10_000, math.inf, s) == 1.0
    # No warm-up at all.
    assert lr_factor(0, spe, Schedule(warmup_iters=0, milestones=[1])) == 1.0
    assert lr_factor(5, spe, Schedule(warmup_iters=0, milestones=[1], gamma=0.5)) == 0.5
    # Fractional milestones: 0.8 of an epoch of 5 steps is step 4.
    frac = Schedule(warmup_iters=0, milestones=[0.8], gamma=0.1)
    assert lr_factor(3, spe, frac) == 1.0 and lr_factor(4, spe, frac) == pytest.approx(0.1)
    assert load_config(overrides=["schedule.milestones=[0.75, 1]"]).schedule.milestones == [0.75, 1]


def test_sections_are_derived_from_the_api() -> None:
    """One source of truth: every section's keys, types and defaults are the API's own."""
    import inspect

    from structkd import Distiller
    from structkd.data import build_transforms, make_synthetic_coco
    from structkd.detectors import DetectorFamily
    from structkd.engine import Balance, Optim, TrainerOptions
    from structkd.models import DetectorSpec

    cfg = Config()
    fields = lambda obj: [f.name for f in dataclasses.fields(obj)]  # noqa: E731
    params = inspect.signature(Distiller.__init__).parameters
    keyword = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    assert fields(cfg.distill) == ["method", *keyword, "options", "imports",
                                   *fields(Balance)]
    assert {n: params[n].default for n in keyword} == {
        n: getattr(cfg.distill, n) for n in keyword}
    assert all(getattr(cfg.distill, f.name) == getattr(Balance(), f.name)
               for f in dataclasses.fields(Balance))
    assert fields(cfg.model) == [*fields(DetectorFamily),
                                 *(f for f in fields(DetectorSpec) if f != "num_classes")]
    assert {f: getattr(cfg.model, f) for f in fields(DetectorFamily)} == dataclasses.asdict(
        DetectorFamily())
    synthetic = inspect.signature(make_synthetic_coco).parameters
    assert fields(cfg.data.synthetic) == [n for n in synthetic if n != "overwrite"]
    assert all(getattr(cfg.data.synthetic, n) == p.default for n, p in synthetic.items()
               if n not in ("root", "overwrite"))
    augment = [n for n in inspect.signature(build_transforms).parameters if n != "train"]
    assert set(augment) | set(fields(Loader)) <= set(fields(cfg.data))
    assert cfg.loader() == Loader()
    assert isinstance(cfg.optim, Optim) and isinstance(cfg.schedule, Schedule)
    assert isinstance(cfg.trainer, TrainerOptions)


@pytest.mark.parametrize(("old", "new"), [
    ("data.synthetic_train=64", "data.synthetic.num_train"),
    ("data.synthetic_options={clutter: 2}", "data.synthetic.<option>"),
    ("data.hflip=0.2", "data.hflip_prob"),
    ("distill.distance=ssim", "distill.method"),
])
def test_renamed_keys_say_where_they_went(old: str, new: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"is now '{new}")):
        load_config(overrides=[old])


def test_method_options_checked_after_imports(tmp_path: Path, monkeypatch) -> None:
    """A method registered by a module in distill.imports is known to the same load."""
    (tmp_path / "my_kd_methods.py").write_text(
        "from structkd.methods import DistillMethod, register_method\n"
        "@register_method('recipe_test_cosine')\n"
        "class Cos(DistillMethod):\n"
        "    def __init__(self, levels, *, weight: float = 1.0, scale: float = 1.0):\n"
        "        super().__init__(levels, weight=weight)\n"
        "    def level_loss(self, name, s, t, ctx):\n"
        "        return (s - t).abs().mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(overrides=["distill.imports=[my_kd_methods]",
                                 "distill.method=recipe_test_cosine", "distill.options.scale=2"])
    assert cfg.distill.method == "recipe_test_cosine"
    with pytest.raises(ValueError, match=r"\['scal'\] are not accepted .* \['scale', 'weight'\]"):
        load_config(overrides=["distill.imports=[my_kd_methods]",
                               "distill.method=recipe_test_cosine", "distill.options.scal=2"])
    with pytest.raises(ValueError, match=r"distill.imports: cannot import 'no_such_kd_module'"):
        load_config(overrides=["distill.imports=[no_such_kd_module]"])


def test_teacher_source_is_one_of_checkpoint_or_builder() -> None:
    with pytest.raises(ValueError, match=r"teacher.checkpoint='a' and torchvision='b' are both"):
        load_config(overrides=["teacher.checkpoint=a", "teacher.torchvision=b"])
    with pytest.raises(ValueError, match=r"teacher.weights='X.Y' goes with torchvision"):
        load_config(overrides=["teacher.checkpoint=a", "teacher.weights=X.Y"])


def test_a_student_of_another_family_is_checked_when_the_config_loads() -> None:
    cfg = load_config(overrides=["model.family=transformers", "model.name=rt_detr"])
    assert cfg.spec(7) is None and cfg.model.size == "tiny"
    with pytest.raises(ConfigError, match=r"family='yolox'; expected one of \['torchvision', "
                                          r"'transformers'"):
        load_config(overrides=["model.family=yolox", "model.name=x"])
    with pytest.raises(ConfigError, match=r"family='transformers' needs a name"):
        load_config(overrides=["model.family=transformers"])
    with pytest.raises(ConfigError, match=r"name='rt_detr' goes with a family other than "
                                          r"torchvision"):
        load_config(overrides=["model.name=rt_detr"])


def test_torchvision_keys_set_for_a_model_of_another_family_are_refused() -> None:
    """A model of another family would ignore them silently; its input size keys stay."""
    base = ["model.family=ultralytics", "model.name=yolo26n.yaml"]
    cfg = load_config(overrides=[*base, "model.min_size=320", "model.max_size=320"])
    assert (cfg.model.min_size, cfg.model.max_size) == (320, 320)
    with pytest.raises(ConfigError, match=r"^model.backbone='resnet50', fpn_channels=16: "
                                          r"torchvision key\(s\) that a ultralytics model "
                                          r"ignores \(it is built from name='yolo26n.yaml'"):
        load_config(overrides=[*base, "model.backbone=resnet50", "model.fpn_channels=16"])


def test_a_teacher_with_random_weights_is_refused_unless_allowed(coco_data) -> None:
    """A teacher the config builds from a model YAML / type, or a torchvision builder without
    weights, has random weights: refused with the key that allows it; allowed, it builds."""
    from kdtest import data_overrides
    from structkd.recipes import load_teacher

    cases = [("teacher.torchvision=retinanet_resnet50_fpn", "teacher.num_classes=7",
              r"teacher.torchvision='retinanet_resnet50_fpn' without teacher.weights has "
              r"random weights")]
    if importlib.util.find_spec("ultralytics"):
        cases.append(("teacher.family=ultralytics", "teacher.name=yolo11n.yaml",
                      r"teacher.name='yolo11n.yaml' \(a ultralytics model built from its "
                      r"configuration\) has random weights"))
    if importlib.util.find_spec("transformers"):
        cases.append(("teacher.family=transformers", "teacher.name=rt_detr",
                      r"teacher.name='rt_detr' \(a transformers model"))
    for a, b, message in cases:
        cfg = load_config(overrides=[*data_overrides(coco_data), a, b])
        with pytest.raises(ValueError, match=message + r".*teacher.allow_untrained=true"):
            load_teacher(cfg, 7)
        cfg = load_config(overrides=[*data_overrides(coco_data), a, b,
                                     "teacher.allow_untrained=true"])
        model, _ = load_teacher(cfg, 7)
        assert isinstance(model, nn.Module) and len(list(model.parameters())) > 0


def test_several_methods_as_a_yaml_list_or_a_joined_name(tmp_path: Path) -> None:
    """``method: [mgd, bckd]`` in YAML is ``mgd+bckd`` (what runs and tables show); options go
    per method, checked per method before any detector exists."""
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  method: [mgd, bckd]\n  weight: auto\n"
                    "  options:\n    bckd: {loc_weight: 2.0}\n")
    cfg = load_config(path)
    assert cfg.distill.method == "mgd+bckd"
    assert cfg.distill.options == {"bckd": {"loc_weight": 2.0}}
    assert load_config(overrides=["distill.method=mgd+bckd"]).distill.method == "mgd+bckd"
    with pytest.raises(ConfigError, match=r"options of several methods are given per method"):
        load_config(overrides=["distill.method=[mgd, bckd]", "distill.options={beta: 2.0}"])
    with pytest.raises(ConfigError, match=r"'nosuch' is unknown"):
        load_config(overrides=["distill.method=[mgd, nosuch]"])
