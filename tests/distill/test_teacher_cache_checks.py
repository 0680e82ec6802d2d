"""The teacher cache checks what it reads and where it writes: a shard of another teacher's
cache, a flipped byte, rotated ids and changed images are refused naming the file; writers into
one folder take turns; what cannot be written is said in one line."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import structkd.distill.teacher_cache as tc
from kdtest import cli_inprocess, distill_config, tiny_overrides
from structkd.data import CocoDetection, SyntheticPaths, build_transforms
from structkd.distill import TeacherCache, write_teacher_cache
from structkd.recipes import build_run, cache_teacher, load_config
from structkd.recipes.cache_config import expected_key
from structkd.recipes.from_config import load_teacher

SHARD = 3  # images per shard here: the 8 training images in 3 shards


@pytest.fixture(scope="module")
def setting(coco_data, teacher_run, tmp_path_factory):
    """The student, the teacher and another teacher (its weights scaled: the same levels'
    shapes, other values), the unaugmented data and each teacher's cache key."""
    cfg = distill_config(coco_data, teacher_run, tmp_path_factory.mktemp("setting"))
    run = build_run(cfg)
    teacher, _ = load_teacher(cfg)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.05)
    train = CocoDetection(cfg.data.train_ann, cfg.data.train_images, build_transforms(False))
    return SimpleNamespace(cfg=cfg, student=run.student, teacher=teacher, other=other, data=train,
                           key=expected_key(cfg, run.student, train, teacher),
                           other_key=expected_key(cfg, run.student, train, other))


def _write(s, out, *, other=False, dataset=None, **kwargs):
    return write_teacher_cache(out, s.student, s.other if other else s.teacher,
                               s.data if dataset is None else dataset,
                               key=s.other_key if other else s.key,
                               **{"batch_size": 2, "shard_images": SHARD, "progress": False,
                                  **kwargs})


@pytest.fixture(scope="module")
def genuine(setting, tmp_path_factory):
    """A cache in 3 shards, and the tensors the writer handed to safetensors for each (image
    id, variant), the rows mapped to ids by the data's order (not by what the cache says)."""
    import safetensors.torch

    written = []
    real = safetensors.torch.save_file

    def record(tensors, filename, metadata=None):
        written.append({k: t.clone() for k, t in tensors.items()})
        return real(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = record
    try:
        cache = _write(setting, tmp_path_factory.mktemp("genuine") / "cache")
    finally:
        safetensors.torch.save_file = real
    ids = setting.data.image_ids
    levels = {(ids[s * SHARD + r], v): {k: t[r, v] for k, t in shard.items()}
              for s, shard in enumerate(written) for r in range(len(next(iter(shard.values()))))
              for v in range(2)}
    return cache, levels


def _copy(cache, tmp_path, name="copy"):
    shutil.copytree(cache.root, tmp_path / name)
    return tmp_path / name


def _keys(cache):
    return [(i, v) for i in sorted(cache.index) for v in range(len(cache.variants))]


def _same_levels(a, b) -> bool:
    x, y = a.features(_keys(a)), b.features(_keys(b))
    return list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_a_genuine_cache_reads_what_the_writer_wrote(genuine, setting) -> None:
    cache, levels = genuine
    again = TeacherCache(cache.root)
    assert len(again.manifest["shards"]) == 3 and len(levels) == 2 * len(setting.data)
    for (image_id, variant), want in levels.items():
        got = again.features([(image_id, variant)])
        assert list(got) == list(want)
        for k in got:
            assert torch.equal(got[k][0], want[k].float()), (image_id, variant, k)


def test_a_shard_is_hashed_once_per_version(genuine, tmp_path, monkeypatch) -> None:
    """Opens after the first read the shards' headers, not their bytes (the stamp beside the
    cache, or this process's record); a copy, a young file or a removed stamp is hashed again."""
    hashed = []
    digest = tc.file_digest
    monkeypatch.setattr(tc, "file_digest", lambda p: hashed.append(p) or digest(p))
    root = _copy(genuine[0], tmp_path)
    TeacherCache(root)
    TeacherCache(root)
    assert len(hashed) == 6  # copied just now: a write in the same clock tick keeps the times
    monkeypatch.setattr(tc, "_RACY_NS", 0)
    hashed.clear()
    TeacherCache(root)
    assert len(hashed) == 3 and (root / tc.STAMP).is_file()
    TeacherCache(root)
    monkeypatch.setattr(tc, "_verified", {})  # another process: the stamp file only
    TeacherCache(root)
    assert len(hashed) == 3
    (root / tc.STAMP).unlink()
    monkeypatch.setattr(tc, "_verified", {})
    TeacherCache(root)
    assert len(hashed) == 6


def test_a_shard_of_another_teachers_cache_is_refused(genuine, setting, tmp_path,
                                                       monkeypatch) -> None:
    cache, _ = genuine
    other = _write(setting, tmp_path / "other", other=True)
    assert not _same_levels(cache, other)  # another teacher's levels, the same shapes
    root = _copy(cache, tmp_path)
    shard = root / "shard-00001.safetensors"
    shutil.copy2(other.root / shard.name, shard)
    assert shard.stat().st_size == (cache.root / shard.name).stat().st_size
    with pytest.raises(ValueError, match=r"shard \S*/copy/shard-00001.safetensors has sha256 "
                                         r"\w+\.\.\., the manifest says \w+\.\.\.: damaged, or "
                                         r"copied from another cache; run `structkd "
                                         r"cache-teacher` again"):
        TeacherCache(root)
    # overwritten in place after a check was stamped, its mtime set back: the ctime differs
    monkeypatch.setattr(tc, "_RACY_NS", 0)
    root = _copy(cache, tmp_path, "stamped")
    TeacherCache(root)
    shard = root / "shard-00001.safetensors"
    before = shard.stat()
    time.sleep(0.05)
    with open(shard, "r+b") as f:
        f.write((other.root / shard.name).read_bytes())
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(ValueError, match=r"stamped/shard-00001.safetensors has sha256"):
        TeacherCache(root)


def test_a_flipped_byte_is_refused_naming_the_shard(genuine, tmp_path) -> None:
    root = _copy(genuine[0], tmp_path)
    shard = root / "shard-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01  # a level's value
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard \S*shard-00002.safetensors has sha256 .*"
                                         r"damaged"):
        TeacherCache(root)
    raw[-5] ^= 0x01
    raw[12] ^= 0x20  # in the header
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard \S*shard-00002.safetensors "):
        TeacherCache(root)


def test_rotated_or_swapped_image_ids_are_refused(genuine, setting, tmp_path) -> None:
    ids = setting.data.image_ids
    root = _copy(genuine[0], tmp_path)
    path = root / tc.MANIFEST
    original = json.loads(path.read_text())
    m = copy.deepcopy(original)
    first = m["shards"][0]["image_ids"]
    assert first == ids[:SHARD]
    m["shards"][0]["image_ids"] = first[1:] + first[:1]
    path.write_text(json.dumps(m))
    want = ", ".join(str(i) for i in ids[:SHARD])
    got = ", ".join(str(i) for i in ids[1:SHARD] + ids[:1])
    with pytest.raises(ValueError, match=rf"shard \S*shard-00000.safetensors holds image ids "
                                         rf"\[{want}\] \(3\), the manifest \S+ lists \[{got}\] "
                                         r"\(3\) for it: the manifest was edited"):
        TeacherCache(root)
    m = copy.deepcopy(original)  # one id of the first shard swapped with one of the second
    a, b = m["shards"][0]["image_ids"], m["shards"][1]["image_ids"]
    a[0], b[0] = b[0], a[0]
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"shard \S*shard-00000.safetensors holds image ids"):
        TeacherCache(root)
    m = copy.deepcopy(original)
    m["format"] = 1
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"cache format 1; this structkd reads format 2: write "
                                         r"the cache again"):
        TeacherCache(root)


def test_a_damaged_shard_is_rewritten_by_the_next_write(genuine, setting, tmp_path,
                                                        caplog) -> None:
    root = _copy(genuine[0], tmp_path)
    shard = root / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01
    shard.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger="structkd"):
        again = _write(setting, root)
    assert "shard-00001.safetensors has sha256" in caplog.text
    assert "writing it and the shards after it again" in caplog.text
    assert "continuing after 1 of 3 shards" in caplog.text
    assert _same_levels(again, genuine[0])


def test_changed_images_are_refused_naming_them(coco_data, teacher_run, tmp_path) -> None:
    """An image replaced in place under the same annotation file: its content is in the key; a
    touched image (new mtime, same content) is still the cache's."""
    root = tmp_path / "data"
    shutil.copytree(coco_data.root, root)
    data = SyntheticPaths(root, *(root / p.relative_to(coco_data.root) for p in (
        coco_data.train_ann, coco_data.train_images, coco_data.val_ann, coco_data.val_images)))
    cache = cache_teacher(distill_config(data, teacher_run, tmp_path), tmp_path / "cache",
                          batch_size=8, progress=False)
    assert len(json.loads((cache.root / tc.SOURCES).read_text())) == 8

    def run():
        return build_run(load_config(overrides=tiny_overrides(
            data, tmp_path / "r", f"teacher.cache={cache.root}", "distill.method=ssim")))

    train = CocoDetection(data.train_ann, data.train_images)
    first, second = train.image_path(0), train.image_path(1)
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert isinstance(run().teacher, TeacherCache)
    assert first.read_bytes() != second.read_bytes()
    first.write_bytes(second.read_bytes())  # same size and shape: the annotations still fit
    with pytest.raises(ValueError, match=rf"teacher cache \S+ was written from other image "
                                         rf"files: 1 of 8 changed since \(e\.g\. "
                                         rf"{re.escape(str(first))}\), its levels are of the old "
                                         r"images"):
        run()
    (cache.root / tc.SOURCES).unlink()  # no table: every image hashed, the key differs
    with pytest.raises(ValueError, match=r"written for another setting: data: .*image_files"):
        run()


def _slow(data, delay: float):
    class Slow:
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            time.sleep(delay)
            return data[i]

    return Slow()


def test_two_writers_into_one_folder_take_turns(setting, tmp_path, caplog) -> None:
    """A second writer started while the first writes waits for it: then reuses its cache (the
    same key) or refuses to replace it (another key); the cache left is the first's, whole."""
    ref = _write(setting, tmp_path / "alone", batch_size=1, shard_images=2)
    for other, reused in ((True, False), (False, True)):
        out = tmp_path / f"shared-{reused}"
        results: dict[str, object] = {}

        def write(name, other, delay, out=out, results=results):
            slow = _slow(setting.data, delay)
            try:
                results[name] = _write(setting, out, other=other, dataset=slow, batch_size=1,
                                       shard_images=2)
            except ValueError as e:
                results[name] = e

        first = threading.Thread(target=write, args=("first", False, 0.3))
        second = threading.Thread(target=write, args=("second", other, 0.0))
        with caplog.at_level(logging.INFO, logger="structkd"):
            first.start()
            while first.is_alive() and not (out / "shard-00000.safetensors").exists():
                time.sleep(0.01)
            second.start()
            first.join()
            second.join()
        assert isinstance(results["first"], TeacherCache)
        assert "is writing into it; waiting for it to finish" in caplog.text
        if reused:
            assert isinstance(results["second"], TeacherCache)
            assert "is complete for this setting; reusing it" in caplog.text
        else:
            assert isinstance(results["second"], ValueError)
            assert str(results["second"]) == (
                f"teacher cache {out}: the writer this one waited for finished a cache of "
                "another setting there (differing in teacher); write this one into another "
                "folder (--out)")
        left = TeacherCache(out)
        assert left.key == setting.key and _same_levels(left, ref)
        caplog.clear()


def test_a_writer_in_another_process_is_waited_for(setting, tmp_path, caplog) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nfrom filelock import FileLock\n"
         "lock = FileLock(sys.argv[1]); lock.acquire()\n"
         "open(sys.argv[1], 'w').write(f'pid {os.getpid()} on here')\n"
         "print('held', flush=True); time.sleep(1.5); lock.release()", str(out / tc.LOCK)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with caplog.at_level(logging.INFO, logger="structkd"):
            cache = _write(setting, out)
        assert time.perf_counter() - start > 1.0
    finally:
        holder.wait(timeout=30)
    assert f"pid {holder.pid} on here is writing into it; waiting" in caplog.text
    assert cache.key == setting.key


def _cli(teacher_run, coco_data, tmp_path, out, *extra):
    args = ["cache-teacher", "--teacher", str(teacher_run.export_prefix), "--out", str(out),
            *extra]
    for o in tiny_overrides(coco_data, tmp_path / "unused"):
        args += ["--set", o]
    r = cli_inprocess(args)
    lines = r.stderr.splitlines(keepends=True)  # the information lines of the set-up, then it
    assert r.returncode == 2 and lines[-1].startswith("structkd: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("structkd: error:") == 1
    return lines[-1]


@pytest.mark.parametrize("value", ["-3", "0"])
def test_a_batch_size_under_one_is_refused(teacher_run, coco_data, tmp_path, value) -> None:
    err = _cli(teacher_run, coco_data, tmp_path, tmp_path / "c", "--batch-size", value)
    assert err == (f"structkd: error: teacher cache batch_size={value} (cache-teacher "
                   "--batch-size): expected a whole number of images, at least 1\n")
    assert not (tmp_path / "c").exists()


def test_out_on_a_file_is_refused(teacher_run, coco_data, tmp_path) -> None:
    (tmp_path / "f").write_text("")
    err = _cli(teacher_run, coco_data, tmp_path, tmp_path / "f")
    assert err == (f"structkd: error: teacher cache out (cache-teacher --out)='{tmp_path / 'f'}' "
                   "is an existing file; expected a folder (or a path that does not exist yet)\n")


def _read_only(folder, monkeypatch) -> None:
    """``folder`` read-only: by its mode, or (as root, whom modes do not stop) by refusing its
    temporary files as the OS would."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real = tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and os.path.samefile(dir, folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)


def test_a_read_only_folder_is_refused_unless_it_holds_the_cache(genuine, setting, teacher_run,
                                                                  coco_data, tmp_path,
                                                                  monkeypatch) -> None:
    (tmp_path / "ro").mkdir()
    _read_only(tmp_path / "ro", monkeypatch)
    try:
        err = _cli(teacher_run, coco_data, tmp_path, tmp_path / "ro")
        assert err == (f"structkd: error: teacher cache out (cache-teacher --out)="
                       f"'{tmp_path / 'ro'}': cannot write into {tmp_path / 'ro'} "
                       f"({os.strerror(errno.EACCES)}); choose a writable folder\n")
        root = _copy(genuine[0], tmp_path, "finished")
        _read_only(root, monkeypatch)
        assert _same_levels(_write(setting, root), genuine[0])  # read, not written
    finally:
        for d in (tmp_path / "ro", tmp_path / "finished"):
            if d.exists():
                d.chmod(0o755)


@pytest.mark.parametrize("how", ["OSError", "SafetensorError"])
def test_a_full_disk_is_one_line_and_the_write_continues(genuine, setting, tmp_path,
                                                         monkeypatch, caplog, how) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file
    calls = []

    def full_after_one(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 1:
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # what fitted
        if how == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_after_one)
    out = tmp_path / "cache"
    with pytest.raises(ValueError) as e:
        _write(setting, out)
    reason = (os.strerror(errno.ENOSPC) if how == "OSError" else
              "Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(e.value) == (
        f"teacher cache out (cache-teacher --out)='{out}': writing shard-00001.safetensors "
        f"failed ({reason}); free space or choose another folder (the shards written so far "
        "are kept: the next run continues after them)")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "shard-00000.safetensors"]  # the partial shard removed
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    with caplog.at_level(logging.INFO, logger="structkd"):
        again = _write(setting, out)
    assert "continuing after 1 of 3 shards" in caplog.text
    assert _same_levels(again, genuine[0])


def test_full_disk_from_the_cli_is_one_line(teacher_run, coco_data, tmp_path,
                                            monkeypatch) -> None:
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    err = _cli(teacher_run, coco_data, tmp_path, tmp_path / "c")
    assert err.startswith(f"structkd: error: teacher cache out (cache-teacher --out)="
                          f"'{tmp_path / 'c'}': writing shard-00000.safetensors failed (No space "
                          "left on device); free space")


def test_an_int8_cache_names_the_key_to_set(coco_data, teacher_run, tmp_path) -> None:
    cfg = distill_config(coco_data, teacher_run, tmp_path, "teacher.cache_dtype=int8")
    cache = cache_teacher(cfg, tmp_path / "int8", batch_size=8, progress=False)

    def run(*extra):
        return build_run(load_config(overrides=tiny_overrides(
            coco_data, tmp_path / "r", f"teacher.cache={cache.root}", "distill.method=ssim",
            *extra)))

    with pytest.raises(ValueError, match=r"teacher cache \S+ holds int8 levels, this run has "
                                         r"teacher.cache_dtype=float16: set "
                                         r"teacher.cache_dtype=int8 \(--set "
                                         r"teacher.cache_dtype=int8\) to train from it"):
        run()
    assert run("teacher.cache_dtype=int8").teacher.key["dtype"] == "int8"
