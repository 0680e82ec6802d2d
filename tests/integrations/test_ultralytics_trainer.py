"""structkd methods inside Ultralytics' own trainer: a YOLO11 teacher into a YOLO26 student
(MGD), a torchvision RetinaNet into a YOLOv8 student (SSIM) and a transformers RT-DETR into a
YOLO11 student (CWD), one tiny epoch each.

Checked: the ``distill`` loss item is finite and non-zero, the student's weights and the method's
parameters were trained (the method's got gradients), and ``last.pt`` holds the student alone:
it loads with ``ultralytics.YOLO`` in a process that never imports structkd, with exactly a
fresh student's state-dict keys, and no pickled reference to structkd.
"""

from __future__ import annotations

import copy
import json
import os
import pickletools
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from kdtest import IMAGE_SIZE, NUM_CLASSES
from structkd.data import SyntheticPaths

os.environ.setdefault("YOLO_OFFLINE", "1")
ultralytics = pytest.importorskip("ultralytics")

from structkd.integrations.ultralytics import (  # noqa: E402
    DISTILL_KEY,
    DistillCriterion,
    UltralyticsDistillation,
    distill_trainer,
    strip_structkd,
)


@pytest.fixture(autouse=True)
def _ultralytics_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ultralytics' settings and runs under tmp_path; nothing leaves the machine."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics"))


@pytest.fixture(scope="module")
def yolo_data(coco_data: SyntheticPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from structkd.data.yolo_format import to_yolo

    return to_yolo(coco_data.train_ann, coco_data.train_images, coco_data.val_ann,
                   coco_data.val_images, tmp_path_factory.mktemp("yolo") / "data")


def _probe(base: type, record: dict[str, Any]) -> type:
    """``base`` recording the student's first weights and the method's gradients per step."""

    class Probe(base):  # type: ignore[misc, valid-type]
        def _setup_train(self) -> None:
            super()._setup_train()
            record["start"] = copy.deepcopy(self.model.state_dict())
            record["method_start"] = copy.deepcopy(self.distillation.method.state_dict())

        def optimizer_step(self) -> None:
            grads = [p.grad for p in self.distillation.parameters()]
            record.setdefault("grad_norms", []).append(
                sum(float(g.abs().sum()) for g in grads if g is not None))
            record.setdefault("grads_missing", []).append(sum(g is None for g in grads))
            super().optimizer_step()

    return Probe


def _train(student_yaml: str, trainer: type, data: Path, project: Path) -> Any:
    from ultralytics import YOLO

    model = YOLO(student_yaml)
    model.train(data=str(data), trainer=trainer, epochs=1, imgsz=IMAGE_SIZE, batch=4,
                workers=0, device="cpu", project=str(project), name="run", exist_ok=True,
                plots=False, amp=False, seed=0, verbose=False)
    return model


def _load_elsewhere(path: Path) -> dict[str, Any]:
    """Load ``path`` with plain ``ultralytics.YOLO`` in a process that never imports structkd."""
    code = (
        "import json, sys\n"
        "from ultralytics import YOLO\n"
        "from ultralytics.nn.tasks import DetectionModel\n"
        f"m = YOLO({str(path)!r})\n"
        "fresh = DetectionModel(m.model.yaml, nc=m.model.nc, verbose=False)\n"
        "print(json.dumps({'structkd': any(k.startswith('structkd') for k in sys.modules),\n"
        "                  'keys': sorted(m.model.state_dict()),\n"
        "                  'fresh': sorted(fresh.state_dict()),\n"
        "                  'type': type(m.model).__name__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=path.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pickled_modules(path: Path) -> set[str]:
    """The modules whose classes or functions a torch checkpoint's pickle references."""
    modules: set[str] = set()
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not name.endswith(".pkl"):
                continue
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(z.read(name)):
                if op.name == "GLOBAL":
                    modules.add(str(arg).split(" ")[0])
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    modules.add(strings[-2])
                if isinstance(arg, str):
                    strings.append(arg)
    return modules


def _check_run(model: Any, record: dict[str, Any]) -> None:
    trainer = model.trainer
    assert DISTILL_KEY in trainer.loss_names
    value = float(trainer.tloss[DISTILL_KEY])
    assert torch.isfinite(torch.tensor(value)) and value != 0.0
    csv = (trainer.save_dir / "results.csv").read_text().splitlines()[0]
    assert f"train/{DISTILL_KEY}" in csv
    # the student trained
    changed = [k for k, v in trainer.model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, record["start"][k])]
    assert changed
    # the method's parts got gradients and were stepped
    assert record["grad_norms"] and all(n > 0 for n in record["grad_norms"])
    assert record["grads_missing"] == [0] * len(record["grads_missing"])
    method = trainer.distillation.method.state_dict()
    assert any(not torch.equal(v, record["method_start"][k]) for k, v in method.items())
    groups = {g.get("param_group") for g in trainer.optimizer.param_groups}
    assert "distill" in groups
    # the hooks are gone after training; the checkpoint holds the student alone
    assert not strip_structkd(trainer.model)
    last = trainer.last
    assert not [m for m in _pickled_modules(last) if m.startswith("structkd")]
    loaded = _load_elsewhere(last)
    assert loaded["type"] == "DetectionModel" and not loaded["structkd"]
    assert loaded["keys"] == loaded["fresh"]
    info = json.loads((trainer.save_dir / "distill.json").read_text())
    assert info["pairs"] and (trainer.save_dir / "distill_state.pt").is_file()


def test_yolo11_teacher_into_yolo26_student_mgd(yolo_data: Path, tmp_path: Path,
                                                 one_thread: None) -> None:
    from structkd.detectors.ultralytics_build import yolo_detector

    teacher = yolo_detector("yolo11n.yaml", NUM_CLASSES)
    record: dict[str, Any] = {}
    trainer = _probe(distill_trainer(teacher, "mgd", weight=1e-3), record)
    model = _train("yolo26n.yaml", trainer, yolo_data, tmp_path / "runs")
    _check_run(model, record)
    assert [p.stride for p in model.trainer.distillation.pairs] == [8, 16, 32]


def test_yolo11_teacher_into_yolo11_student_scoreweighted(yolo_data: Path, tmp_path: Path,
                                                          one_thread: None) -> None:
    """A head-level method inside Ultralytics' trainer: the teacher's head runs on its levels
    and weights the projected features (Ultralytics' own loss, in structkd's code)."""
    from structkd.detectors.ultralytics_build import yolo_detector

    teacher = yolo_detector("yolo11n.yaml", NUM_CLASSES)
    head_calls: list[int] = []
    teacher.model.model[-1].register_forward_hook(lambda *_: head_calls.append(1))
    record: dict[str, Any] = {}
    trainer = _probe(distill_trainer(teacher, "scoreweighted"), record)
    model = _train("yolo11n.yaml", trainer, yolo_data, tmp_path / "runs")
    _check_run(model, record)
    assert head_calls  # the teacher's head ran (its confidences weight the term)
    assert set(model.trainer.distillation.method.projectors) == {"s8", "s16", "s32"}


def test_a_feature_and_a_head_method_together_in_ultralytics_trainer(
        yolo_data: Path, tmp_path: Path, one_thread: None) -> None:
    """``scoreweighted+bckd`` inside Ultralytics' trainer: one wiring, both parts trained and
    summed (the projectors of the first get gradients)."""
    from structkd.detectors.ultralytics_build import yolo_detector
    from structkd.methods.together import Together

    teacher = yolo_detector("yolo11n.yaml", NUM_CLASSES)
    record: dict[str, Any] = {}
    trainer = _probe(distill_trainer(teacher, "scoreweighted+bckd",
                                            bckd={"loc_weight": 2.0}), record)
    model = _train("yolo26n.yaml", trainer, yolo_data, tmp_path / "runs")
    _check_run(model, record)
    method = model.trainer.distillation.method
    assert isinstance(method, Together) and list(method.parts) == ["scoreweighted", "bckd"]
    assert method.parts["bckd"].loc_weight == 2.0


def test_torchvision_retinanet_teacher_into_yolov8_student_ssim(
        yolo_data: Path, tmp_path: Path, one_thread: None) -> None:
    from structkd.models import DetectorSpec, build_detector

    teacher = build_detector(DetectorSpec("retinanet", NUM_CLASSES, "resnet18", fpn_channels=32,
                                          min_size=IMAGE_SIZE, max_size=IMAGE_SIZE))
    record: dict[str, Any] = {}
    trainer = _probe(distill_trainer(teacher, "ssim"), record)
    model = _train("yolov8n.yaml", trainer, yolo_data, tmp_path / "runs")
    _check_run(model, record)
    frozen = model.trainer.distillation.frozen
    assert frozen.renormalise  # ImageNet mean/std for the torchvision teacher
    assert not any(p.requires_grad for p in frozen.model.parameters())
    assert not frozen.model.training


def test_transformers_rtdetr_teacher_into_yolo11_student_cwd(
        yolo_data: Path, tmp_path: Path, one_thread: None) -> None:
    """A DETR-family teacher (transformers, Apache-2.0) inside Ultralytics' trainer: its hybrid
    encoder's levels pair by stride with the YOLO student's, and it never runs its decoder."""
    pytest.importorskip("transformers")
    from structkd.detectors.transformers_build import transformers_detector

    teacher = transformers_detector("rt_detr", NUM_CLASSES, num_queries=50)
    decoder_calls: list[int] = []
    teacher.model.model.decoder.register_forward_hook(lambda *_: decoder_calls.append(1))
    record: dict[str, Any] = {}
    trainer = _probe(distill_trainer(teacher, "cwd"), record)
    model = _train("yolo11n.yaml", trainer, yolo_data, tmp_path / "runs")
    _check_run(model, record)
    assert [p.stride for p in model.trainer.distillation.pairs] == [8, 16, 32]
    assert not model.trainer.distillation.frozen.renormalise  # RT-DETR takes [0, 1] pixels
    assert decoder_calls == []


def test_refusals_and_copies(one_thread: None, caplog: pytest.LogCaptureFixture) -> None:
    from ultralytics.nn.tasks import DetectionModel

    from structkd.detectors.ultralytics_build import yolo_detector

    teacher = yolo_detector("yolo11n.yaml", NUM_CLASSES)
    with pytest.raises(ValueError, match="auto"):
        distill_trainer(teacher, "ssim", weight="auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown"):
        distill_trainer(teacher, "no-such-method")
    trainer_cls = distill_trainer(teacher, "cwd")
    with pytest.raises(ValueError, match="distill_model"):
        trainer_cls(overrides={"distill_model": "teacher.pt", "data": "x.yaml"})

    student = DetectionModel("yolov8n.yaml", nc=NUM_CLASSES - 1, verbose=False)
    spec = trainer_cls.distill_spec
    with pytest.raises(ValueError, match="stride"):  # layer 0 has stride 2: nothing pairs
        UltralyticsDistillation(student, type(spec)(spec.teacher, "cwd",
                                                    student_layers="model.0"),
                                torch.device("cpu"))
    distillation = UltralyticsDistillation(student, spec, torch.device("cpu"))
    assert [p.stride for p in distillation.pairs] == [8, 16, 32]
    # A state file of an earlier structkd (no teacher fingerprint, no weight or options): the
    # method's name and the pairs are checked, a warning says the rest cannot be.
    state = distillation.state_dict()
    old = {"method": state["method"], "pairs": ["s8", "s16", "s32"], "method_name": "cwd"}
    with caplog.at_level("WARNING", logger="structkd.integrations"):
        distillation.load_state_dict(old, "old.pt")
    assert "old.pt does not record the teacher's fingerprint" in caplog.text
    with pytest.raises(ValueError, match=r'cannot resume with old\.pt: .*method: saved '
                                         r'\{"name": "mgd"\} vs now \{"name": "cwd"\}'):
        distillation.load_state_dict({**old, "method_name": "mgd"}, "old.pt")
    with pytest.raises(ValueError, match=r'pairs: saved \["s16"\] vs now \["s8", "s16", "s32"\]'):
        distillation.load_state_dict({**old, "pairs": ["s16"]}, "old.pt")
    distillation.attach()
    assert isinstance(student.criterion, DistillCriterion)
    clone = copy.deepcopy(student)  # what Ultralytics' EMA would take
    assert not isinstance(clone.criterion, DistillCriterion)
    assert strip_structkd(clone) == 3 and not strip_structkd(clone)
    distillation.detach()
    assert not isinstance(student.criterion, DistillCriterion) and not strip_structkd(student)


def test_resume_restores_the_method(yolo_data: Path, tmp_path: Path, one_thread: None) -> None:
    """An interrupted run resumes with the method's trained parts and optimiser groups; a
    resume with another teacher or method, or with a method state of another epoch, is refused
    before Ultralytics restores the optimiser, naming both values."""
    from ultralytics import YOLO

    from structkd.detectors import as_detector
    from structkd.detectors.ultralytics_build import yolo_detector
    from structkd.distill import weights_fingerprint

    torch.manual_seed(0)
    teacher = yolo_detector("yolo11n.yaml", NUM_CLASSES)
    record: dict[str, Any] = {}

    class First(distill_trainer(teacher, "mgd", weight=1e-3)):  # type: ignore[misc]
        def _setup_train(self) -> None:
            super()._setup_train()
            record["initial"] = copy.deepcopy(self.distillation.method.state_dict())

    class Interrupted(Exception):
        pass

    def stop(trainer: Any) -> None:
        if trainer.epoch == 1:
            raise Interrupted

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_epoch_start", stop)
    with pytest.raises(Interrupted):
        model.train(data=str(yolo_data), trainer=First, epochs=2, imgsz=IMAGE_SIZE, batch=4,
                    workers=0, device="cpu", project=str(tmp_path / "runs"), name="run",
                    exist_ok=True, plots=False, amp=False, seed=0, verbose=False,
                    nbs=4, warmup_epochs=0)  # a step per batch from the start
    run = tmp_path / "runs" / "run"
    last = run / "weights" / "last.pt"
    saved = torch.load(run / "distill_state.pt", weights_only=True)
    assert any(not torch.equal(v, record["initial"][k]) for k, v in saved["method"].items())
    mine = weights_fingerprint(as_detector(teacher))
    assert json.loads((run / "distill.json").read_text())["teacher_fingerprint"] == mine

    def refused(trainer: type) -> str:
        with pytest.raises(ValueError) as e:
            YOLO(last).train(resume=True, trainer=trainer)
        assert "parameter group" not in str(e.value)
        return str(e.value)

    torch.manual_seed(1)  # a YOLO11n of other random weights
    other = yolo_detector("yolo11n.yaml", NUM_CLASSES)
    theirs = weights_fingerprint(as_detector(other))
    assert theirs != mine
    text = refused(distill_trainer(other, "mgd", weight=1e-3))
    assert f'teacher: saved "{mine}" vs now "{theirs}"' in text
    text = refused(distill_trainer(teacher, "pkd"))  # no trainable parts: fewer groups
    assert re.search(r'method: saved \{"name": "mgd".*"weight": 0\.001\} vs now '
                     r'\{"name": "pkd"', text), text
    text = refused(distill_trainer(teacher, "mgd", weight=1e-2))
    assert re.search(r'method: saved .*"weight": 0\.001\} vs now .*"weight": 0\.01\}', text)
    torch.save({**saved, "epoch": 7}, run / "distill_state.pt")  # killed between the saves
    assert "of epoch 7, the checkpoint" in refused(distill_trainer(teacher, "mgd", weight=1e-3))
    torch.save(saved, run / "distill_state.pt")

    class Resumed(distill_trainer(copy.deepcopy(teacher), "mgd",  # type: ignore[misc]
                                  weight=1e-3)):
        def _setup_train(self) -> None:
            super()._setup_train()
            record["method"] = copy.deepcopy(self.distillation.method.state_dict())
            record["start_epoch"] = self.start_epoch

    resumed = YOLO(last)
    resumed.train(resume=True, trainer=Resumed)
    assert record["start_epoch"] == 1
    assert all(torch.equal(v, saved["method"][k]) for k, v in record["method"].items())
    assert DISTILL_KEY in resumed.trainer.loss_names
    assert not [m for m in _pickled_modules(last) if m.startswith("structkd")]
