"""Runs that cannot silently go wrong or lose work: exact resume after a kill, protected run
directories, stopped divergence, early config and data errors (issue "Nothing silently wrong")."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdtest import SRC, distill, tiny_overrides, train
from structkd.engine.training.callbacks import DivergenceGuard
from structkd.engine.training.module import DetectionModule
from structkd.recipes import load_config


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "structkd.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# ---- exact resume after an interruption ------------------------------------------------------
def _kill_mid_run_and_resume(coco_data, tmp_path: Path, arch: str, sig: int) -> None:
    """Train 3 epochs uninterrupted; train again, kill the process right after the first
    checkpoint is written (so inside epoch 2), resume with trainer.resume=last: every tensor of
    the final weights equals the uninterrupted run's. Default loader workers (2). The
    uninterrupted run and the one to kill run at the same time (two processes, two folders)."""
    common = ["data.num_workers=2", f"model.arch={arch}", "schedule.max_steps=null",
              "schedule.epochs=3", "data.batch_size=1", "schedule.warmup_iters=2",
              "trainer.log_every=1"]
    full = tmp_path / "full"
    full_proc = _cli(["train", *_sets(tiny_overrides(coco_data, full, *common))])
    try:
        part = tmp_path / "part"
        proc = _cli(["train", *_sets(tiny_overrides(coco_data, part, *common))])
        ckpt = part / "checkpoints" / "last.ckpt"
        deadline = time.time() + 600
        while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # into the next epoch (or its validation)
        for _ in range(20):
            # Python drops a KeyboardInterrupt that lands in a destructor (e.g. a DataLoader
            # iterator's __del__: "Exception ignored in ..."), and the run goes on; like a
            # user, press Ctrl+C again until the process stops.
            proc.send_signal(sig)
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait(timeout=120)
        assert not (part / "results.json").is_file(), "the run finished before it was interrupted"
        step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
        assert 0 < step < 24
        proc = _cli(["train", *_sets(tiny_overrides(coco_data, part, *common,
                                                    "trainer.resume=last"))])
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
        assert full_proc.wait(timeout=600) == 0, full_proc.stderr.read()[-3000:]
        assert json.loads((part / "results.json").read_text())["steps"] == 24
        assert _same(_weights(full), _weights(part))
        m_full = json.loads((full / "results.json").read_text())["metrics"]
        m_part = json.loads((part / "results.json").read_text())["metrics"]
        assert m_full["AP"] == m_part["AP"]
    finally:
        if full_proc.poll() is None:  # a failed check above: stop it
            full_proc.kill()


def test_resume_after_sigkill_is_exact_retinanet(coco_data, tmp_path) -> None:
    _kill_mid_run_and_resume(coco_data, tmp_path, "retinanet", signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "sig"), [("fcos", signal.SIGINT),
                                           ("fasterrcnn", signal.SIGKILL),
                                           ("fasterrcnn", signal.SIGINT)])
def test_resume_after_interrupt_is_exact(coco_data, tmp_path, arch, sig) -> None:
    _kill_mid_run_and_resume(coco_data, tmp_path, arch, sig)


def test_failed_validation_loses_no_training(coco_data, tmp_path, monkeypatch) -> None:
    """A validation image that fails to load in epoch 2's validation: the epoch's training is
    already saved, and resuming from it ends exactly like an uninterrupted run."""
    from structkd.data import CocoDetection

    common = ("schedule.max_steps=null", "schedule.epochs=3", "schedule.warmup_iters=1")
    train(load_config(overrides=tiny_overrides(coco_data, tmp_path / "full", *common)))
    original = CocoDetection.__getitem__
    calls = {"val": 0}

    def flaky(self, index):
        if self.ann_file.name == "val.json":
            calls["val"] += 1
            # fit reads val[0] once to check its structure; then come the validation passes
            if calls["val"] > 1 + len(self):  # the second validation pass
                raise OSError(f"image {index} is unreadable")
        return original(self, index)

    monkeypatch.setattr(CocoDetection, "__getitem__", flaky)
    part = tmp_path / "part"
    with pytest.raises(OSError, match="unreadable"):
        train(load_config(overrides=tiny_overrides(coco_data, part, *common)))
    ckpt = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # both epochs' training (2 steps each) are saved
    assert ckpt["structkd"]["data"]["train_ann"] == _sha256(coco_data.train_ann)  # checked now
    monkeypatch.setattr(CocoDetection, "__getitem__", original)
    train(load_config(overrides=tiny_overrides(coco_data, part, *common, "trainer.resume=last")))
    assert _same(_weights(tmp_path / "full"), _weights(part))


class _RateProbe:
    """Reads the optimiser's learning rate and momentum at every training step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def __call__(self):
        import lightning as L

        probe = self

        class Probe(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                group = trainer.optimizers[0].param_groups[0]
                probe.seen.append((trainer.global_step, group["lr"], group["momentum"]))

        return Probe()


def test_resume_applies_a_changed_rate_and_schedule(coco_data, tmp_path) -> None:
    """Resumed with a new optim.lr, optim.momentum and schedule.gamma: the optimiser runs at
    them from the resumed step on, as the schedule's formula (written out here) gives."""
    from structkd.recipes import run_config

    common = ("schedule.max_steps=null", "schedule.epochs=2", "schedule.warmup_iters=0",
              "schedule.milestones=[1.5]", "optim.lr=0.01")
    out = tmp_path / "run"
    train(load_config(overrides=tiny_overrides(coco_data, out, *common, "schedule.epochs=1")))
    probe = _RateProbe()
    cfg = load_config(overrides=tiny_overrides(
        coco_data, out, *common, "trainer.resume=last", "optim.lr=0.1", "optim.momentum=0.5",
        "schedule.gamma=0.5", "distill.method=none"))
    run_config(cfg, callbacks=[probe()])
    # epoch 2 of 2 steps per epoch: steps 2 and 3; the rate drops by gamma at 1.5 epochs
    expected = [(2, 0.1, 0.5), (3, 0.1 * 0.5, 0.5)]
    assert [(s, pytest.approx(lr, rel=1e-12), m) for s, lr, m in probe.seen] == expected
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.1  # the config.yaml of the run says what ran


def test_resume_without_changes_leaves_the_restored_optimiser_alone(coco_data, tmp_path) -> None:
    from structkd.recipes import run_config

    common = ("schedule.max_steps=null", "schedule.epochs=2", "schedule.warmup_iters=3",
              "schedule.milestones=[1.5]")
    probe_full, probe_part = _RateProbe(), _RateProbe()
    run_config(load_config(overrides=tiny_overrides(coco_data, tmp_path / "full", *common,
                                                    "distill.method=none")),
               callbacks=[probe_full()])
    part = tmp_path / "part"
    train(load_config(overrides=tiny_overrides(coco_data, part, *common, "schedule.epochs=1")))
    run_config(load_config(overrides=tiny_overrides(coco_data, part, *common,
                                                    "trainer.resume=last",
                                                    "distill.method=none")),
               callbacks=[probe_part()])
    assert probe_part.seen == probe_full.seen[2:]  # bit for bit, warm-up included


@pytest.fixture(scope="module")
def plain_run(coco_data, tmp_path_factory) -> Path:
    """The default tiny run (2 steps), trained once for the checks below that start from a
    finished run; each works on its own copy (:func:`_finished_run`)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    threads = torch.get_num_threads()
    try:
        train(load_config(overrides=tiny_overrides(coco_data, out)))
    finally:
        torch.set_num_threads(threads)
    return out


def _finished_run(plain_run: Path, tmp_path: Path) -> Path:
    """``tmp_path / "run"`` holding a copy of ``plain_run``: what training the default tiny
    config into it leaves (its config.yaml and results.json name the original folder)."""
    import shutil

    return Path(shutil.copytree(plain_run, tmp_path / "run"))


@pytest.mark.parametrize(("change", "key"), [
    ("trainer.seed=5", "trainer.seed: checkpoint 0 vs now 5"),
    ("data.batch_size=2", "data.batch_size: checkpoint 4 vs now 2"),
    ("optim.name=adamw", 'optim.name: checkpoint "sgd" vs now "adamw"'),
    ("trainer.precision=64-true", 'trainer.precision: checkpoint "32-true" vs now "64-true"'),
])
def test_resume_refuses_what_makes_another_run(coco_data, plain_run, tmp_path, change,
                                               key) -> None:
    out = _finished_run(plain_run, tmp_path)
    with pytest.raises(ValueError, match=re.escape(key)):
        train(load_config(overrides=tiny_overrides(coco_data, out, "trainer.resume=last",
                                                   change)))


def _sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def test_resume_refuses_other_training_data(coco_data, plain_run, tmp_path) -> None:
    """Another annotation file (one box moved by a pixel) or another image folder (a copy) is
    another run: refused naming ``data`` and both values. The same precision spelled another
    way (``32``, Lightning's old name of "32-true") is the same run."""
    import shutil

    out = _finished_run(plain_run, tmp_path)
    ann = json.loads(Path(coco_data.train_ann).read_text())
    ann["annotations"][0]["bbox"][0] += 1.0
    other_ann = tmp_path / "train_other.json"
    other_ann.write_text(json.dumps(ann))
    before, after = _sha256(coco_data.train_ann), _sha256(other_ann)
    assert before != after
    with pytest.raises(ValueError, match=rf'another run; data: checkpoint \{{"train_ann": '
                                         rf'"{before}".* vs now \{{"train_ann": "{after}"'):
        train(load_config(overrides=tiny_overrides(coco_data, out, "trainer.resume=last",
                                                   f"data.train_ann={other_ann}")))
    other_images = shutil.copytree(coco_data.train_images, tmp_path / "images_copy")
    then, now = (re.escape(str(Path(p).resolve())) for p in (coco_data.train_images,
                                                                other_images))
    with pytest.raises(ValueError, match=rf'data: checkpoint .*"train_images": "{then}".* vs '
                                         rf'now .*"train_images": "{now}"'):
        train(load_config(overrides=tiny_overrides(coco_data, out, "trainer.resume=last",
                                                   f"data.train_images={other_images}")))
    resumed = train(load_config(overrides=tiny_overrides(
        coco_data, out, "trainer.resume=last", "trainer.precision=32", "schedule.epochs=2",
        "schedule.max_steps=3")))
    assert resumed.steps == 3


def test_resume_of_an_earlier_checkpoint_warns_what_it_cannot_check(coco_data, plain_run,
                                                                   tmp_path, caplog) -> None:
    """A checkpoint of a structkd that recorded neither the data nor the precision resumes
    (what it records is still checked) with a warning naming both keys."""
    out = _finished_run(plain_run, tmp_path)
    path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt["structkd"]["data"], ckpt["structkd"]["options"]["trainer.precision"]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"data.batch_size: checkpoint 4 vs now 2"):
        train(load_config(overrides=tiny_overrides(coco_data, out, "trainer.resume=last",
                                                   "data.batch_size=2")))
    with caplog.at_level("WARNING", logger="structkd.engine"):
        resumed = train(load_config(overrides=tiny_overrides(
            coco_data, out, "trainer.resume=last", "schedule.epochs=2",
            "schedule.max_steps=3")))
    assert resumed.steps == 3
    assert re.search(r"does not record data, trainer\.precision .*cannot be checked",
                     caplog.text), caplog.text


def test_resume_keeps_one_metrics_row_per_step(coco_data, tmp_path, monkeypatch) -> None:
    """Interrupted after the epoch-1 checkpoint (step 2) in step 3: the resumed run redoes
    step 2 on; metrics.csv has each step once, like an uninterrupted run's."""
    common = ("schedule.max_steps=null", "schedule.epochs=2", "trainer.log_every=1",
              "trainer.val_every=0")
    train(load_config(overrides=tiny_overrides(coco_data, tmp_path / "full", *common)))
    original = DetectionModule.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == 3:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DetectionModule, "training_step", interrupted)
    part = tmp_path / "part"
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        train(load_config(overrides=tiny_overrides(coco_data, part, *common)))
    monkeypatch.setattr(DetectionModule, "training_step", original)
    steps_before = _steps(part / "metrics.csv")
    assert steps_before.count(2) == 1  # step 2 ran and was logged before the interrupt
    train(load_config(overrides=tiny_overrides(coco_data, part, *common, "trainer.resume=last")))
    steps = _steps(part / "metrics.csv")
    assert steps == _steps(tmp_path / "full" / "metrics.csv")
    assert len(steps) == len(set(steps))


def _steps(path: Path) -> list[int]:
    import csv

    with path.open(newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_resume_refuses_a_pickle_payload(coco_data, plain_run, tmp_path) -> None:
    """A checkpoint carrying a pickled object is refused (loaded with weights_only=True) and
    its payload never runs."""
    out = _finished_run(plain_run, tmp_path)
    marker = tmp_path / "pwned"
    ckpt_path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt["payload"] = _Payload(str(marker))
    torch.save(ckpt, ckpt_path)
    with pytest.raises(ValueError, match=r"not a readable checkpoint"):
        train(load_config(overrides=tiny_overrides(coco_data, out, "trainer.resume=last")))
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- run directories -------------------------------------------------------------------------
def test_a_finished_run_is_never_overwritten(coco_data, tmp_path) -> None:
    out = tmp_path / "run"
    first = train(load_config(overrides=tiny_overrides(coco_data, out)))
    before = _weights(out)
    second = train(load_config(overrides=tiny_overrides(coco_data, out, "trainer.seed=5")))
    assert first.out_dir == out and second.out_dir == tmp_path / "run-2"
    assert _same(before, _weights(out))  # untouched
    assert (tmp_path / "run-2" / "results.json").is_file()
    third = train(load_config(overrides=tiny_overrides(coco_data, out, "trainer.seed=5",
                                                       "trainer.overwrite=true")))
    assert third.out_dir == out and _same(_weights(out), _weights(tmp_path / "run-2"))


def test_config_is_written_only_after_it_validates(coco_data, plain_run, tmp_path) -> None:
    out = _finished_run(plain_run, tmp_path)
    saved = (out / "config.yaml").read_text()
    bad = tiny_overrides(coco_data, out, "trainer.resume=last", "distill.method=ssim",
                         f"teacher.checkpoint={tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="missing"):
        distill(load_config(overrides=bad))
    assert (out / "config.yaml").read_text() == saved


def test_resume_appends_to_the_metrics_log(coco_data, tmp_path) -> None:
    out = tmp_path / "run"
    common = ("schedule.max_steps=null", "schedule.warmup_iters=1")
    train(load_config(overrides=tiny_overrides(coco_data, out, *common, "schedule.epochs=1")))
    with (out / "metrics.csv").open() as f:
        first = [r["step"] for r in csv.DictReader(f) if r.get("train/loss")]
    train(load_config(overrides=tiny_overrides(coco_data, out, *common, "schedule.epochs=2",
                                               "trainer.resume=last")))
    with (out / "metrics.csv").open() as f:
        steps = [r["step"] for r in csv.DictReader(f) if r.get("train/loss")]
    assert first == ["0", "1"] and steps == ["0", "1", "2", "3"]


# ---- divergence ------------------------------------------------------------------------------
def _poison(monkeypatch, at_call: int, value: float) -> None:
    original = DetectionModule.training_step
    calls = {"n": 0}

    def poisoned(self, batch, batch_idx):
        calls["n"] += 1
        loss = original(self, batch, batch_idx)
        return loss * value if calls["n"] == at_call else loss

    monkeypatch.setattr(DetectionModule, "training_step", poisoned)


def test_an_exploding_loss_stops_the_run_from_the_first_steps(coco_data, tmp_path,
                                                              monkeypatch) -> None:
    """A finite loss 1e12 times the first ones, at the sixth step (the guard's 20-step median
    is not there yet), stops the run before that step is applied; the kept checkpoint holds
    step 4 and equals the weights of the same run stopped at step 4."""
    _poison(monkeypatch, at_call=6, value=1e12)
    out = tmp_path / "run"
    common = ("schedule.epochs=4", "data.batch_size=2", "trainer.val_every=0")
    cfg = load_config(overrides=tiny_overrides(coco_data, out, "schedule.max_steps=null",
                                               *common))
    with pytest.raises(FloatingPointError, match=r"exploding loss .*than 100x the largest loss "
                                                 r".* at step 5 \(epoch 1\)") as e:
        train(cfg)
    assert "holds step 4 (every step up to it passed this check) and is kept" in str(e.value)
    kept = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert kept["global_step"] == 4
    assert not (out / "results.json").exists() and not (out / "student.safetensors").exists()
    monkeypatch.undo()
    train(load_config(overrides=tiny_overrides(coco_data, tmp_path / "ref",
                                               "schedule.max_steps=4", *common)))
    ref = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", map_location="cpu",
                     weights_only=True)
    assert ref["global_step"] == 4
    assert all(torch.equal(kept["state_dict"][k], v) for k, v in ref["state_dict"].items())


def test_a_nan_before_any_checkpoint_claims_none_was_kept(coco_data, tmp_path,
                                                         monkeypatch) -> None:
    _poison(monkeypatch, at_call=1, value=float("nan"))
    with pytest.raises(FloatingPointError, match="no checkpoint had been written yet"):
        train(load_config(overrides=tiny_overrides(coco_data, tmp_path / "run")))
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_guard_thresholds() -> None:
    g = DivergenceGuard(factor=100, window=5, min_steps=3)
    assert g._problem(float("inf")) == "non-finite loss"
    assert g._problem(1e9) is None  # the first step: only non-finite values are refused
    g.history.extend([1.0, 2.0])  # before min_steps: the level is the largest loss so far
    assert g._problem(199.0) is None
    assert "than 100x the largest loss 2" in g._problem(201.0)
    g.history.append(0.8)  # min_steps reached: the median of the window
    assert g._problem(99.0) is None
    assert "than 100x the median 1" in g._problem(101.0)


@pytest.mark.slow
def test_ddp_ranks_stop_together_on_one_ranks_nan(tmp_path, coco_data) -> None:
    """Two DDP processes; only rank 1 sees a NaN loss: both stop with the error (no hang)."""
    script = Path(__file__).with_name("ddp_nan_child.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(script.parents[1])])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"),
                           str(coco_data.root)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.count("another process saw a non-finite") >= 1 or \
        proc.stderr.count("non-finite loss") >= 2, proc.stderr[-3000:]


# ---- early, clear config and data errors -----------------------------------------------------
@pytest.mark.parametrize("override", ["optim.lr=.nan", "optim.lr=.inf", "optim.grad_clip=-.inf",
                                      "schedule.gamma=.nan"])
def test_non_finite_config_values_are_refused(override) -> None:
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key}=.*expected a finite number"):
        load_config(overrides=[override])


def test_partial_data_paths_are_an_error(coco_data, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\['data.train_ann', 'data.val_images'\] not set"):
        load_config(overrides=[f"data.val_ann={coco_data.val_ann}",
                               f"data.train_images={coco_data.train_images}",
                               f"trainer.out_dir={tmp_path / 'run'}"])


def test_builtin_data_is_announced(tmp_path, caplog) -> None:
    from structkd.recipes.from_config import resolve_data

    cfg = load_config(overrides=["data.synthetic.num_train=4", "data.synthetic.num_val=2",
                                 "data.synthetic.image_size=64",
                                 f"data.synthetic.root={tmp_path / 'syn'}"])
    with caplog.at_level("INFO", logger="structkd.engine"):
        resolve_data(cfg)
    assert "using the built-in synthetic dataset" in caplog.text
