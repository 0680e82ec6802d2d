"""The teacher cache: written once, read for every method with the live teacher's values (within
the storage precision), refused when stale or foreign, continued after an interruption."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from kdtest import cli_inprocess, distill_config, slow_except, tiny_overrides
from structkd.data import CocoDetection, build_transforms
from structkd.data.collate import collate_fn as collate
from structkd.distill import Distiller, TeacherCache, write_teacher_cache
from structkd.recipes import build_run, cache_teacher, load_config, run_config
from structkd.recipes.from_config import load_teacher

METHODS = ["ssim", "l1", "mse", "pkd", "cwd", "mgd", "fgd"]
# int8 storage: the loss within 0.2% of the live teacher's (measured on these levels: at most
# 1.8e-4 relative over 3 batches and the 7 methods; float16: 1.2e-4)
INT8_REL = 2e-3


@pytest.fixture(scope="module")
def written(coco_data, teacher_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    cfg = distill_config(coco_data, teacher_run, tmp)
    return cfg, cache_teacher(cfg, tmp / "cache", batch_size=3, progress=False)


def _batch(cfg, seed: int):
    train = CocoDetection(cfg.data.train_ann, cfg.data.train_images,
                          build_transforms(True, hflip_prob=0.5))
    torch.manual_seed(seed)
    return collate([train[i] for i in range(4)])


def _live_and_cached_losses(cfg, cache, method: str):
    """The losses of one batch (with and without flips) from the live teacher and the cache,
    same student, same method parts, same RNG."""
    run = build_run(cfg)
    teacher, _ = load_teacher(cfg)
    live = Distiller(copy.deepcopy(run.student).train(), teacher, method)
    cached = Distiller(copy.deepcopy(run.student).train(), cache, method)
    cached.method.load_state_dict(live.method.state_dict())  # same adapters / generators
    images, targets = _batch(cfg, seed=0)
    assert any(t["hflip"] for t in targets) and not all(t["hflip"] for t in targets)
    torch.manual_seed(0)
    a = live(images, targets)
    torch.manual_seed(0)
    return a, cached(images, targets)


def _live_and_cached_levels(cfg, cache):
    """The live teacher's levels of one batch and the cache's for the same images and flips
    (with the run and the live Distiller that made them)."""
    run = build_run(cfg)
    teacher, _ = load_teacher(cfg)
    live = Distiller(copy.deepcopy(run.student).train(), teacher, "mse")
    images, targets = _batch(cfg, seed=5)
    live(images, targets)
    batch, sizes, _ = live.tap.batch()
    want = live.teacher_features(batch, sizes)
    got = cache.features([(int(t["image_id"]), int(t["hflip"])) for t in targets])
    assert list(got) == list(want)
    return run, live, want, got


@pytest.mark.parametrize("method", slow_except(METHODS, "ssim", "mgd", "fgd"))
def test_the_loss_from_the_cache_is_the_live_teachers(written, method: str) -> None:
    a, b = _live_and_cached_losses(*written, method)
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("distill"):
            # float16 storage: ~3 significant digits of each teacher value
            assert float(b[k]) == pytest.approx(float(a[k]), rel=2e-3, abs=1e-6), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_cached_levels_equal_the_teachers_to_float16(written) -> None:
    cfg, cache = written
    run, live, want, got = _live_and_cached_levels(cfg, cache)
    for k in want:
        assert torch.allclose(got[k], want[k].to(torch.float16).float(), rtol=0, atol=0), k
        assert torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-3), k
    assert cache.variants == ["as is", "hflip"] and len(cache.index) == 8
    cached = Distiller(copy.deepcopy(run.student).train(), cache, "mse")
    assert cached.teacher_fingerprint() == live.teacher_fingerprint()
    with pytest.raises(RuntimeError, match=r"reads the teacher's levels from the cache"):
        _ = cached.teacher


@pytest.fixture(scope="module")
def written_int8(coco_data, teacher_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache8")
    cfg = distill_config(coco_data, teacher_run, tmp, "teacher.cache_dtype=int8")
    return cfg, cache_teacher(cfg, tmp / "cache", batch_size=3, progress=False)


def test_int8_levels_are_within_half_a_step_of_the_teachers(written, written_int8) -> None:
    """Each cached value is within half a quantisation step of the teacher's, the step being
    (max - min) / 255 of its image's channel (computed here with NumPy from the live levels),
    and the cache takes one byte per value plus the affine maps."""
    cfg, cache = written_int8
    *_, want, got = _live_and_cached_levels(cfg, cache)
    worst = 0.0
    for k in want:
        w = want[k].double().numpy()
        step = (w.max(axis=(2, 3)) - w.min(axis=(2, 3)))[..., None, None] / 255
        err = np.abs(got[k].double().numpy() - w)
        assert (err <= step / 2 * (1 + 1e-4) + 1e-7).all(), k
        worst = max(worst, float(err.max()))
    assert worst > 0  # really quantised (a 1x1 level is exact: min = max)
    # one byte per value plus a float32 min and scale per image, variant and channel (a
    # safetensors header of a few KiB per shard beside): float16 takes two bytes per value
    data = {"float16": 0, "int8": 0}
    for name, c in (("float16", written[1]), ("int8", cache)):
        for channels, height, width in c.shapes.values():
            maps = len(c.index) * len(c.variants) * channels
            data[name] += maps * (2 * height * width if name == "float16"
                                  else height * width + 8)
        written_bytes = sum(sh["bytes"] for sh in c.manifest["shards"])
        assert data[name] <= written_bytes <= data[name] + 8192 * len(c.manifest["shards"])


@pytest.mark.parametrize("method", slow_except(METHODS, "ssim", "fgd"))
def test_the_loss_from_an_int8_cache_is_near_the_live_teachers(written_int8, method) -> None:
    a, b = _live_and_cached_losses(*written_int8, method)
    for k in a:
        if k.startswith("distill"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=INT8_REL, abs=1e-6), k


def test_a_stale_or_foreign_cache_is_refused_naming_what_differs(written, coco_data,
                                                                 teacher_run, tmp_path) -> None:
    _, cache = written
    base = [f"teacher.cache={cache.root}"]
    no_flip = load_config(overrides=tiny_overrides(coco_data, tmp_path / "r", *base,
                                                   "distill.method=ssim", "data.hflip_prob=0"))
    with pytest.raises(ValueError, match=r"written for another setting: variants: cache "
                                         r"\[\"as is\", \"hflip\"\] vs run \[\"as is\"\]"):
        build_run(no_flip)
    bigger = load_config(overrides=tiny_overrides(coco_data, tmp_path / "r", *base,
                                                  "distill.method=ssim", "model.min_size=96",
                                                  "model.max_size=96"))
    with pytest.raises(ValueError, match=r"student_transform: cache .*\"min_size\": \[64\]"):
        build_run(bigger)
    scaled = load_config(overrides=tiny_overrides(coco_data, tmp_path / "r", *base,
                                                  "distill.method=ssim",
                                                  "data.scale_range=[0.8,1.2]"))
    with pytest.raises(ValueError, match=r"data.scale_range=\[0.8, 1.2\] draws a continuous "
                                         r"scale.*set data.scale_range=\[1, 1\]"):
        build_run(scaled)
    other = copy.deepcopy(cache)
    other.key = {**cache.key, "teacher": "0" * 16}
    with pytest.raises(ValueError, match=r"teacher weights: cache 0000000000000000 vs run"):
        other.check(cache.key | {"teacher": cache.key["teacher"]})


def test_a_truncated_or_incomplete_cache_names_the_file(written, tmp_path) -> None:
    import shutil

    _, cache = written
    copy_dir = tmp_path / "c"
    shutil.copytree(cache.root, copy_dir)
    shard = copy_dir / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard .*shard-00000.safetensors has \d+ bytes, the "
                                         r"manifest says \d+: truncated"):
        TeacherCache(copy_dir)
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["complete"] = False
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"the cache is incomplete .*run `structkd "
                                         r"cache-teacher` again"):
        TeacherCache(copy_dir)
    with pytest.raises(FileNotFoundError, match=r"is not a teacher cache"):
        TeacherCache(tmp_path / "nothing")


def test_an_interrupted_write_continues_to_the_same_cache(written, tmp_path, caplog) -> None:
    cfg, cache = written
    run = build_run(cfg)
    teacher, _ = load_teacher(cfg)
    plain = CocoDetection(cfg.data.train_ann, cfg.data.train_images, build_transforms(False))

    class Dies:
        def __len__(self):
            return len(plain)

        def __getitem__(self, i):
            if i == 5:
                raise KeyboardInterrupt
            return plain[i]

    kwargs = {"key": cache.key, "batch_size": 2, "shard_images": 4, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(tmp_path / "w", run.student, teacher, Dies(), **kwargs)
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["complete"] is False
    with caplog.at_level(logging.INFO, logger="structkd"):
        again = write_teacher_cache(tmp_path / "w", run.student, teacher, plain, **kwargs)
    assert "continuing after 1 of 2 shards" in caplog.text
    keys = [(i, v) for i in sorted(again.index) for v in (0, 1)]
    a, b = again.features(keys), cache.features(keys)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_images_of_different_sizes_are_refused(written, tmp_path) -> None:
    cfg, cache = written
    run = build_run(cfg)
    teacher, _ = load_teacher(cfg)
    run.student.transform.min_size, run.student.transform.max_size = (64,), 128
    data = [(torch.rand(3, 64, 64), {"image_id": 1}), (torch.rand(3, 64, 96), {"image_id": 2})]
    with pytest.raises(ValueError, match=r"image id 2 becomes a \[64, 96\] image .*exact only "
                                         r"when every training image has one size"):
        write_teacher_cache(tmp_path / "v", run.student, teacher, data, key=cache.key,
                            batch_size=1, progress=False)


def test_cli_cache_then_distil_from_it(coco_data, teacher_run, tmp_path, caplog) -> None:
    args = ["cache-teacher", "--teacher", str(teacher_run.export_prefix), "--out",
            str(tmp_path / "cache")]
    for o in tiny_overrides(coco_data, tmp_path / "unused"):
        args += ["--set", o]
    r = cli_inprocess(args)
    assert r.returncode == 0, r.stderr
    assert "8 images x 2 variant(s)" in r.stdout
    cfg = load_config(overrides=tiny_overrides(coco_data, tmp_path / "run",
                                               f"teacher.cache={tmp_path / 'cache'}",
                                               "distill.method=mgd"))
    with caplog.at_level(logging.INFO, logger="structkd"):
        result = run_config(cfg)
    assert "the teacher itself is not built" in caplog.text
    assert result.method["name"] == "mgd" and result.steps == 2
    assert result.distill["start_check"]["term"] > 0
    both = cli_inprocess(["distill", "--teacher", str(teacher_run.export_prefix),
                          "--set", f"teacher.cache={tmp_path / 'cache'}"])
    assert both.returncode == 2 and "a run from a cache never builds the teacher" in both.stderr


def test_a_run_from_the_cache_resumes_exactly(written, coco_data, tmp_path) -> None:
    """Interrupted after its first epoch and resumed, a cached run ends with the weights of the
    same run trained without interruption."""
    from safetensors.torch import load_file

    _, cache = written

    def cfg(out, *extra):
        return load_config(overrides=tiny_overrides(
            coco_data, out, f"teacher.cache={cache.root}", "distill.method=ssim",
            "schedule.max_steps=null", *extra))

    whole = run_config(cfg(tmp_path / "whole", "schedule.epochs=2"))
    run_config(cfg(tmp_path / "part", "schedule.epochs=1"))
    resumed = run_config(cfg(tmp_path / "part", "schedule.epochs=2", "trainer.resume=last"))
    assert whole.steps == resumed.steps == 4
    a = load_file(f"{whole.export_prefix}.safetensors")
    b = load_file(f"{resumed.export_prefix}.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["bckd", "mgd+scoreweighted"])
def test_a_head_method_from_a_cache_is_refused_naming_it(written, method) -> None:
    """A cache holds the teacher's features only: a method that reads its head is refused
    before training, with the method's name and what to do."""
    cfg, cache = written
    run = build_run(cfg)
    with pytest.raises(ValueError, match=r"method '(bckd|scoreweighted)' distils the teacher's "
                                         r"head predictions; a teacher cache .* holds its "
                                         r"features only: train with the live teacher"):
        Distiller(copy.deepcopy(run.student).train(), cache, method)
