"""The README's and the documentation site's examples (``docs/*.md``) run as written, with only
what a test must change: tiny sizes and schedules, ``weights_backbone=None`` (no downloads here),
and a local weights file in an empty torch.hub cache for the COCO teacher. Blocks are found by
their section's heading (``_block``); ``tests/test_docs.py`` checks that every block has a test.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision

import structkd
from kdtest import cli_inprocess, cli_subprocess, tiny_overrides
from structkd.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)


def pages() -> list[Path]:
    """The README and the site's pages (the API reference pages hold no code)."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def sections(path: Path) -> dict[str, str]:
    """``{heading: text}`` of a page's ``#`` and ``##`` sections (headings inside code blocks
    are code, not headings); a ``###`` heading stays inside its ``##`` section."""
    out: dict[str, list[str]] = {}
    current, fenced = None, False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,2} (.+)\n?$", line)
        if m:
            current = m.group(1).strip()
            assert current not in out, f"{path.name}: two sections named {current!r}"
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {h: "".join(lines) for h, lines in out.items()}


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of ``text``: ``[(lang, code), ...]``."""
    return FENCE.findall(text)


def _page_of(heading: str) -> Path:
    found = [p for p in pages() if heading in sections(p)]
    assert len(found) == 1, f"section {heading!r} found in {[p.name for p in found]}"
    return found[0]


def _block(heading: str, lang: str = "python", index: int = 0) -> str:
    """The ``index``-th fenced ``lang`` block under the section ``heading`` of the README or of
    a page of ``docs/`` (the heading names one section of them all)."""
    section = sections(_page_of(heading))[heading]
    return [code for tag, code in blocks(section) if tag == lang][index]


def _sub(code: str, old: str, new: str) -> str:
    assert old in code, f"the documented example no longer contains {old!r}"
    return code.replace(old, new)


def _tiny_fit(heading: str) -> str:
    """A documented ``fit`` example at test size: 8 + 4 generated images of 64 px, one step."""
    code = _sub(_block(heading), "num_train=256, num_val=64, image_size=320",
                "num_train=8, num_val=4, image_size=64")
    return code.replace("epochs=12", "epochs=1, max_steps=1, progress=False, num_workers=0, "
                        "batch_size=2, threads=1")


def _exec(code: str, scope: dict) -> dict:
    """Execute a documented example in ``scope``; its variables."""
    exec(compile(code, "<documented example>", "exec"), scope)
    return scope


def _run(code: str, where: Path, monkeypatch) -> dict:
    """Execute a documented example in the folder ``where``; its variables."""
    monkeypatch.chdir(where)
    return _exec(code, {})


def test_distil_your_own_torchvision_model(tmp_path, monkeypatch) -> None:
    code = _tiny_fit("Distil your own torchvision model in 10 lines")
    code = _sub(code, "(num_classes=k, min_size=320, max_size=320)",
                "(num_classes=k, min_size=320, max_size=320, weights_backbone=None)")
    code = _sub(code, "ssdlite320_mobilenet_v3_large(num_classes=k)",
                "ssdlite320_mobilenet_v3_large(num_classes=k, weights_backbone=None)")
    result = _run(code, tmp_path, monkeypatch)["result"]
    assert (tmp_path / "runs" / "ssdlite_ssim" / "results.json").is_file()
    assert result.export_prefix == Path("runs") / "ssdlite_ssim" / "student"
    assert 0 <= result.metrics["AP"] <= 100


@pytest.fixture
def coco_teacher_file(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache holding a (randomly initialised) file of the COCO weights."""
    from structkd.models.weights import weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = weights_file("RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1")
    path.parent.mkdir(parents=True)
    model = torchvision.models.detection.retinanet_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), path)
    return path


def test_torchvision_coco_teacher_python(coco_teacher_file) -> None:
    scope = {"structkd": structkd}
    _exec(_block("A torchvision COCO detector as the teacher"), scope)
    assert scope["info"].class_names[1:4] == ["person", "bicycle", "car"]
    assert len(scope["info"].class_names) == 91


def test_torchvision_coco_teacher_cli(coco_teacher_file, coco_data, tmp_path,
                                     monkeypatch) -> None:
    cmd = _block("A torchvision COCO detector as the teacher", "bash").replace("\\\n", " ")
    args = shlex.split(cmd)
    assert args[:2] == ["structkd", "distill"]
    (tmp_path / "my_student.yaml").write_text("model: {arch: fcos}\n")
    out = tmp_path / "run"
    sets = [a for o in tiny_overrides(coco_data, out) for a in ("--set", o)]
    monkeypatch.chdir(tmp_path)
    proc = cli_inprocess([*args[1:], *sets])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.json").is_file()
    assert "distillation: ssim" in proc.stderr


def test_add_your_own_method() -> None:
    from structkd.methods import DistillContext, Level, build_method, describe_methods

    try:
        scope: dict = {}
        _exec(_block("Add your own method"), scope)
        assert "cosine" in [m.name for m in describe_methods()]
        levels = [Level("s8", 8, 4, 6), Level("s16", 16, 4, 6)]
        method = build_method("cosine", levels, weight=0.5)
        s = {"s8": torch.randn(2, 4, 8, 8, requires_grad=True), "s16": torch.randn(2, 4, 4, 4)}
        t = {"s8": torch.randn(2, 6, 8, 8), "s16": torch.randn(2, 6, 4, 4)}
        out = method(DistillContext(s, t, {lv.name: lv for lv in levels}, (64, 64)))
        assert set(out) == {"distill"} and 0 < out["distill"].item() < 2.0  # 2 levels x 0.5
        out["distill"].backward()
        assert s["s8"].grad is not None
    finally:
        METHODS.pop("cosine", None)


def test_in_your_own_training_loop() -> None:
    from structkd.models import build_detector

    torch.manual_seed(0)
    common = {"arch": "retinanet", "num_classes": 3, "backbone": "resnet18", "min_size": 64,
              "max_size": 64}
    student = build_detector(**common, fpn_channels=16)
    teacher = build_detector(**common, fpn_channels=32)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 60.0, 40.0]]), "labels": torch.tensor([2])}]
    scope = {"torch": torch, "student": student, "teacher": teacher,
             "loader": [(images, targets)]}
    _exec(_block("In your own training loop"), scope)
    assert set(scope["per_level"]) == {"level/s8", "level/s16", "level/s32", "level/s64",
                                       "level/s128"}
    assert torch.isfinite(sum(scope["losses"].values()))


def test_with_your_own_lightning_trainer(coco_data, tmp_path, monkeypatch) -> None:
    from structkd.data import CocoDetection, build_transforms
    from structkd.models import build_detector

    code = _block("With your own Lightning Trainer")
    code = _sub(code, "Loader(batch_size=4)", "Loader(batch_size=4, num_workers=0)")
    code = _sub(code, "L.Trainer(max_epochs=12, gradient_clip_val=10.0)",
                "L.Trainer(max_epochs=1, max_steps=2, gradient_clip_val=10.0, accelerator='cpu', "
                "enable_progress_bar=False, logger=False, enable_checkpointing=False)")
    torch.manual_seed(0)
    common = {"arch": "retinanet", "num_classes": 7, "backbone": "resnet18", "min_size": 64,
              "max_size": 64}
    student = build_detector(**common, fpn_channels=16)
    teacher = build_detector(**common, fpn_channels=32)
    train = CocoDetection(coco_data.train_ann, coco_data.train_images, build_transforms(True))
    val = CocoDetection(coco_data.val_ann, coco_data.val_images, build_transforms(False))
    monkeypatch.chdir(tmp_path)
    scope = {"student": student, "teacher": teacher, "train": train, "val": val}
    _exec(code, scope)
    module = scope["module"]
    assert scope["trainer"].global_step == 2 and len(module.step_times) == 2
    assert 0 <= module.last_metrics["AP"] <= 100 and "per_class" in module.last_metrics
    # The validation pass the Trainer ran and the object-level evaluate agree.
    from structkd import evaluate

    assert evaluate(student, val)["AP"] == module.last_metrics["AP"]


CLI_OUTS = {"train": "runs/teacher", "distill": "runs/student", "compare": "runs/unused",
            "cache-teacher": "runs/unused"}


def _compare_sets(coco_data) -> list[str]:
    """The overrides of the documented ``structkd compare`` at test size: one step per run."""
    return [*tiny_overrides(coco_data, CLI_OUTS["compare"]), "schedule.max_steps=1"]


@pytest.fixture(scope="module")
def cli_page(coco_data, tmp_path_factory):
    """Every command of "Your data on the command line", in order, on the tiny data, in one
    folder: ``(folder, [(args, result), ...])``. Stops at the first command that fails."""
    from kdtest import cli_inprocess

    where = tmp_path_factory.mktemp("cli_page")
    (where / "my_teacher.yaml").write_text("model: {arch: retinanet, fpn_channels: 32}\n")
    (where / "my_student.yaml").write_text("model: {arch: retinanet, fpn_channels: 16}\n")
    lines = [ln.split("#")[0].split() for ln in
             _block("Your data on the command line", "bash").splitlines() if ln.strip()]
    done = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        for words in lines:
            assert words[0] == "structkd"
            args = words[1:]
            if args[0] == "compare":  # one seed, one step per run: the command, not the study
                args += ["--seeds", "1", *[x for o in _compare_sets(coco_data)
                                             for x in ("--set", o)]]
            elif args[0] in CLI_OUTS or args[0] == "eval":
                out = CLI_OUTS.get(args[0], "runs/eval")
                args += [a for o in tiny_overrides(coco_data, out) for a in ("--set", o)]
            if args[0] == "export":
                args = [*args, "--size", "64"]
            proc = cli_inprocess(args)
            done.append((args, proc))
            if proc.returncode != 0:
                break
    return where, done


def test_your_data_on_the_command_line(cli_page, tmp_path) -> None:
    """Every command of the block, in order, on the tiny data; and the YAML example loads."""
    from structkd.recipes import load_config

    yaml_text = _block("Your data on the command line", "yaml")
    (tmp_path / "recipe.yaml").write_text(yaml_text)
    cfg = load_config(tmp_path / "recipe.yaml")
    assert (cfg.model.backbone, cfg.distill.method, cfg.distill.weight) == ("resnet50", "ssim", 2)
    assert (cfg.schedule.epochs, cfg.trainer.devices, cfg.data.batch_size) == (12, 8, 2)

    where, done = cli_page
    commands = [ln.split("#")[0].split()[1] for ln in
                _block("Your data on the command line", "bash").splitlines() if ln.strip()]
    assert [args[0] for args, _ in done] == commands
    for args, proc in done:
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        if args[0] == "distill":
            assert "distillation: fgd" in proc.stderr
        if args[0] == "compare":
            assert "| mgd_auto | auto (" in proc.stdout
    assert (where / "metrics.json").is_file() and (where / "student.onnx").is_file()
    assert (where / "levels" / "manifest.json").is_file()
    assert (where / "structkd_compare" / "report.md").is_file()


def test_does_it_help_on_my_data(cli_page, coco_data, monkeypatch) -> None:
    """The comparison's command and its Python twin, at one seed, into the folder the CLI
    page's ``structkd compare`` (the same rows) wrote: every run is reused, none trained."""
    import json

    from kdtest import cli_inprocess

    where, done = cli_page
    assert all(proc.returncode == 0 for _, proc in done)
    monkeypatch.chdir(where)
    out = "structkd_compare"
    args = shlex.split(_block("Does it help on my data?", "bash").replace("\\\n", " "),
                       comments=True)
    assert args[:2] == ["structkd", "compare"]
    args = " ".join(args[1:])
    args = _sub(args, "--seeds 3", "--seeds 1")
    args = _sub(args, "--out cmp", f"--out {out}").split()
    proc = cli_inprocess([*args, *[x for o in _compare_sets(coco_data) for x in ("--set", o)]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((where / out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["none", "ssim", "mgd_auto"]
    assert all(r["how"] == ["reused"] for r in rows), rows

    code = _block("Does it help on my data?")
    code = _sub(code, 'seeds=3, out="cmp",', f"seeds=1, out={out!r}, overrides=OVERRIDES,")
    scope = _exec(code, {"OVERRIDES": _compare_sets(coco_data)})
    c = scope["c"]
    assert c.out == Path(out) and c.how == {r: ["reused"] for r in ("none", "ssim", "mgd_auto")}
    assert c.gain("mgd_auto").sentence().endswith("run at least 2 seeds (3 or more for a useful "
                                                  "interval)")


def test_other_families_transformers(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    code = _tiny_fit("The DETR family of transformers")
    code = _sub(code, 'backbone="resnet50", min_size=320, max_size=320',
                'backbone="resnet18", fpn_channels=16, min_size=64, max_size=64')
    code = _sub(code, 'size="small",\n                           min_size=320, max_size=320',
                'size="tiny", num_queries=50,\n                           min_size=64, '
                'max_size=64')
    scope = _run(code, tmp_path, monkeypatch)
    assert 0 <= scope["result"].metrics["AP"] <= 100
    assert (tmp_path / "runs" / "rtdetr_cwd" / "student_native" / "config.json").is_file()


@pytest.mark.slow  # tests/cli runs the same config path (and more) in CI
def test_other_families_transformers_cli(coco_data, teacher_run, tmp_path) -> None:
    pytest.importorskip("transformers")
    args = shlex.split(_block("The DETR family of transformers", "bash").replace("\\\n", " "))
    assert args[:2] == ["structkd", "distill"]
    args = [str(teacher_run.export_prefix) if a == "runs/teacher/student" else a
            for a in args[1:]]
    args = [("tiny" if a == "small" and args[i - 1] == "--model.size" else a)
            for i, a in enumerate(args)]
    assert "tiny" in args
    out = tmp_path / "rtdetr"
    sets = [x for o in tiny_overrides(coco_data, out, "model.family=transformers",
                                      "model.options={num_queries: 50}")
            for x in ("--set", o)]  # the family named here too: no torchvision keys
    proc = cli_subprocess([*args, *sets], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "student_native" / "config.json").is_file()


def test_other_families_ultralytics(tmp_path, monkeypatch) -> None:
    pytest.importorskip("ultralytics")
    code = _tiny_fit("YOLO (Ultralytics)")
    code = code.replace("min_size=320, max_size=320", "min_size=64, max_size=64")
    scope = _run(code, tmp_path, monkeypatch)
    assert 0 <= scope["result"].metrics["AP"] <= 100
    assert (tmp_path / "runs" / "yolo26n_mgd" / "student_native.pt").is_file()


def test_inside_ultralytics_own_trainer(tmp_path, monkeypatch) -> None:
    pytest.importorskip("ultralytics")
    code = _block("Inside Ultralytics' own trainer")
    code = _sub(code, "num_train=256, num_val=64, image_size=320",
                "num_train=8, num_val=4, image_size=64")
    small = ("epochs=1, imgsz=64, batch=4, workers=0, device='cpu', plots=False, amp=False, "
             f"project={str(tmp_path / 'runs')!r}, verbose=False")
    code = _sub(code, "teacher.train(data=data_yaml, epochs=30, imgsz=320)",
                f"teacher.train(data=data_yaml, {small}, name='teacher')")
    code = _sub(code, "student.train(data=data_yaml, epochs=30, imgsz=320,",
                f"student.train(data=data_yaml, {small}, name='student',")
    _run(code, tmp_path, monkeypatch)
    run = tmp_path / "runs" / "student"
    assert (run / "weights" / "last.pt").is_file() and (run / "distill_state.pt").is_file()
    assert "distill" in (run / "results.csv").read_text().splitlines()[0]
