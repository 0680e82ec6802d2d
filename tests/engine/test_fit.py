"""``structkd.fit`` on objects: option objects and options by name (named ones win),
a method that needs a teacher, and ``RunResult`` read back from the run folder."""

from __future__ import annotations

import pytest
import torch
import yaml

import structkd
from kdtest import IMAGE_SIZE
from structkd.data import CocoDetection, build_transforms
from structkd.engine import OPTIONS, Loader, Optim, RunResult
from structkd.models import build_detector
from structkd.recipes import load_config

TINY = {"epochs": 1, "max_steps": 1, "batch_size": 4, "num_workers": 0, "progress": False,
        "threads": 1, "warmup_iters": 1}


@pytest.fixture(scope="module")
def datasets(coco_data):
    return (CocoDetection(coco_data.train_ann, coco_data.train_images, build_transforms(True)),
            CocoDetection(coco_data.val_ann, coco_data.val_images, build_transforms(False)))


def _pair():
    torch.manual_seed(0)
    kw = {"arch": "fcos", "num_classes": 7, "backbone": "resnet18", "min_size": IMAGE_SIZE,
          "max_size": IMAGE_SIZE}
    return build_detector(**kw, fpn_channels=16), build_detector(**kw, fpn_channels=32)


def test_objects_and_named_options_make_the_run_and_its_record(datasets, tmp_path) -> None:
    """The run's option objects give every value the call does not name; named options win
    over them; the run folder's config.yaml records what the run used; the caller's objects
    are untouched."""
    student, teacher = _pair()
    optim, loader = Optim(lr=0.005), Loader(batch_size=2)
    result = structkd.fit(student, *datasets, teacher=teacher, method="pkd", weight=3,
                          student_layers=["backbone.fpn"], teacher_layers=["backbone.fpn"],
                          optim=optim, loader=loader, momentum=0.5,
                          out_dir=tmp_path / "run", **{k: v for k, v in TINY.items()
                                                       if k != "batch_size"})
    assert result.method["name"] == "pkd" and result.method["weight"] == 3.0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["distill"]["method"] == "pkd"
    assert saved["distill"]["student_layers"] == ["backbone.fpn"]
    assert saved["distill"]["teacher_layers"] == ["backbone.fpn"]
    assert saved["optim"]["lr"] == 0.005 and saved["data"]["batch_size"] == 2
    assert saved["optim"]["momentum"] == 0.5  # named: wins over the object's 0.9
    assert saved["trainer"]["out_dir"] == str(tmp_path / "run")
    assert (optim.momentum, loader.num_workers) == (0.9, Loader().num_workers)


def test_the_config_path_records_its_config(coco_data, tmp_path) -> None:
    """A run from a config writes that config (its null method resolved) as config.yaml:
    loading it back gives the same config."""
    from kdtest import tiny_overrides
    from structkd.recipes import run_config

    cfg = load_config(overrides=tiny_overrides(coco_data, tmp_path / "run",
                                               "distill.method=none", "optim.lr=0.005"))
    run_config(cfg)
    assert load_config(tmp_path / "run" / "config.yaml").to_dict() == cfg.to_dict()


def test_a_method_without_a_teacher_is_an_error(datasets, tmp_path) -> None:
    student, _ = _pair()
    with pytest.raises(ValueError, match=r"method='ssim' needs a teacher"):
        structkd.fit(student, *datasets, method="ssim", out_dir=tmp_path / "run", **TINY)
    with pytest.raises(ValueError, match=r"method='pkd' needs a teacher"):
        structkd.fit(student, *datasets, method="pkd", weight=3, out_dir=tmp_path / "run",
                     **TINY)
    assert not (tmp_path / "run").exists()


def test_unknown_and_invalid_options_name_themselves(datasets, tmp_path) -> None:
    student, _ = _pair()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rate'\]; expected "
                                         r"some of .*optim: \[.*'lr'"):
        structkd.fit(student, *datasets, learning_rate=0.1, out_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"fit\(\): lr=-1; expected a finite number > 0"):
        structkd.fit(student, *datasets, lr=-1, out_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"fit\(\): batch_size=0; expected an int >= 1"):
        structkd.fit(student, *datasets, batch_size=0, out_dir=tmp_path / "run")


def test_options_are_the_fields_of_the_option_types() -> None:
    """``fit``'s options are derived, each name once: the run's option types and Distiller's
    keyword options."""
    import dataclasses
    import inspect

    from structkd import Distiller
    from structkd.engine import Balance, Loader, Optim, Schedule, TrainerOptions

    expected = {f.name for cls in (Optim, Schedule, Loader, TrainerOptions, Balance)
                for f in dataclasses.fields(cls)} - {"name"} | {"optimizer"}
    params = inspect.signature(Distiller.__init__).parameters.values()
    expected |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert set(OPTIONS) == expected
    assert OPTIONS["optimizer"] == ("optim", "name") and OPTIONS["levels"] == ("distill",
                                                                                "levels")


def test_run_result_reads_back_what_the_run_returned(datasets, tmp_path) -> None:
    student, teacher = _pair()
    result = structkd.fit(student, *datasets, teacher=teacher, out_dir=tmp_path / "run",
                          **{**TINY, "max_steps": 2, "log_every": 1})
    again = RunResult.load(tmp_path / "run")
    assert again.metrics == result.metrics and again.params == result.params
    assert again.method == result.method and again.steps == result.steps == 2
    assert again.export_prefix == result.export_prefix and again.wall_s == result.wall_s
    assert again.history == result.history
    assert [s for s, _ in result.history["train/loss"]] == [0, 1]
    assert set(result.history) >= {"train/loss", "train/distill", "train/level/s8"}


def test_evaluate_objects_equals_the_runs_validation(datasets, tmp_path) -> None:
    student, _ = _pair()
    result = structkd.fit(student, *datasets, out_dir=tmp_path / "run", **TINY)
    metrics = structkd.evaluate(student, datasets[1], batch_size=3)
    assert {k: metrics[k] for k in ("AP", "AP50", "per_class")} == {
        k: result.metrics[k] for k in ("AP", "AP50", "per_class")}
    assert list(metrics["per_class"]) == datasets[1].class_names[1:]


@pytest.mark.parametrize(("train", "problem"), [
    ([1, 2, 3], "item 0 is int 1, not an (image, target) pair"),
    ([(torch.rand(3, 8, 8), {"boxes": torch.zeros(1, 4)})],
     "item 0 has a target without ['labels'] (keys: ['boxes'])"),
    ([(torch.rand(3, 8, 8), {"boxes": torch.zeros(1, 5), "labels": torch.ones(1).long()})],
     "item 0 has 'boxes' of shape (1, 5)"),
    ([(torch.rand(8, 8), {"boxes": torch.zeros(1, 4), "labels": torch.ones(1).long()})],
     "item 0 has an image of shape (8, 8)"),
    ([(torch.rand(3, 8, 8), {"boxes": torch.zeros(2, 4), "labels": torch.ones(1).long()})],
     "item 0 has 'labels' of shape (1,) and dtype torch.int64 for 2 boxes"),
    ([], "the train dataset (list) is empty"),
])
def test_a_malformed_dataset_is_named_before_any_work(train, problem, tmp_path) -> None:
    student, _ = _pair()
    with pytest.raises(ValueError) as e:
        structkd.fit(student, train, out_dir=tmp_path / "run", **TINY)
    assert problem in str(e.value) and "the train dataset (list)" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_sample_check_leaves_the_random_state_alone(datasets) -> None:
    from structkd.engine.first_sample import check_first_sample

    torch.manual_seed(3)
    before = torch.get_rng_state()
    check_first_sample(datasets[0], "train")  # its flip transform draws from the global RNG
    assert torch.equal(torch.get_rng_state(), before)


def test_a_student_that_is_not_a_detector_is_one_clear_error(datasets, tmp_path) -> None:
    with pytest.raises(TypeError, match=r"fit\(student='retinanet'\): expected a detector "
                                        r"\(an nn.Module\), got a str; build one first"):
        structkd.fit("retinanet", *datasets, out_dir=tmp_path / "run", **TINY)
    assert not (tmp_path / "run").exists()


def test_a_student_of_another_class_count_is_refused(datasets, tmp_path) -> None:
    """The data has 6 classes (num_classes 7): a student built for 80 (or 3) is refused before
    any work, naming both counts; the independent count is the annotation file's categories."""
    import json

    categories = len(json.loads(datasets[0].ann_file.read_text())["categories"])
    for k in (81, 4):
        student = build_detector(arch="fcos", num_classes=k, backbone="resnet18",
                                 fpn_channels=16, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)
        with pytest.raises(ValueError, match=rf"the student predicts {k - 1} classes "
                                             rf"\(num_classes={k} with the background\), the "
                                             rf"training data has {categories} "
                                             rf"\(num_classes={categories + 1}\)"):
            structkd.fit(student, *datasets, out_dir=tmp_path / "run", **TINY)


class _Relabelled(torch.utils.data.Dataset):
    """A user's dataset (no ``num_classes``) whose items but the first carry label 9."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, target = self.base[i]
        if i > 0:
            target = {**target, "labels": torch.full_like(target["labels"], 9)}
        return image, target


def test_labels_beyond_the_students_classes_name_label_and_image(datasets, tmp_path) -> None:
    student, _ = _pair()
    train = _Relabelled(datasets[0])
    ids = {int(train[i][1]["image_id"]) for i in range(1, len(train))}
    with pytest.raises(ValueError, match=r"label 9 of image \d+ is outside 1..6: the student "
                                         r"predicts 6 object classes") as error:
        structkd.fit(student, train, None, out_dir=tmp_path / "run",
                     **{**TINY, "batch_size": 2, "max_steps": 2})
    assert int(str(error.value).split()[4]) in ids
