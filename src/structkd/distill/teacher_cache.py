"""The teacher out of the training loop: its tapped levels written once, read by every run.

A cache holds, for every training image and every augmentation variant training can draw (the
image as it is, and mirrored when flips are on), the teacher's levels on exactly the batch the
student's transform makes of it, stored in reduced precision in safetensors shards (one
``(images, variants, C, H, W)`` tensor per level, memory-mapped on read: a step reads only its
images' rows): float16, bfloat16, float32, or int8 (8-bit codes with a min and a scale per image,
variant and channel). A manifest records what the levels depend on (the teacher's weights, its taps,
the student's transform, the data, the variants, the storage dtype): a run whose setting differs
is refused naming what differs. Writing goes shard by shard, each written whole or not at all, so
an interrupted write continues where it stopped; a lock in the folder (``.structkd.lock``) makes
two writers take turns, and one that waited refuses to replace the other's finished cache of
another setting.

Opening checks that every shard is the file written there, naming the file otherwise: its size
(a truncated shard), the image ids stored in its header against the manifest's (ids rotated or
swapped in the manifest), and its sha256 against the one the writer recorded (a flipped byte, a
shard copied from another cache, which has the same size). Hashing the demo's 433 MiB takes
0.3-0.9 s on this 2-core machine from the page cache (more from disk, and in proportion to
the cache's size), so a
shard's digest is checked once per version of the file, (inode, size, mtime, ctime), kept
beside the cache (``.verified.json``, where the folder is writable) and in the process: any
write or replacement changes the ctime, which no tool sets back; a version younger than 2 s (a
file system's clock tick) is checked again. Later opens stat the shards and read their
headers: 2-20 ms for the demo's 11 shards.

The input files' contents can be part of the key too (:func:`file_table`, :func:`table_digest`;
the config path keys on the training images): their table (path, size, mtime, digest) is kept
in the cache (``sources.json``), so a run re-hashes only the files whose size or mtime changed
since and stats the others (2600 demo images, 83 MiB: 8-45 ms to stat, 0.09-0.45 s to hash).

Exact only where every training image becomes a batch of one size after the student's transform
(then padding never differs between the cache and a live batch); the writer refuses otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import writable_dir
from ..detectors import family_defaults, protocol_of
from .pairing import LevelInfo, measure_levels
from .teacher import FrozenTeacher, weights_fingerprint

logger = logging.getLogger("structkd.distill")

__all__ = ["CACHE_DTYPES", "TeacherCache", "cache_key", "check_writer_options", "file_digest",
           "file_table", "read_sources", "table_digest", "write_teacher_cache"]

FORMAT = 2  # 2: shard digests and image ids in the shards' headers
MANIFEST = "manifest.json"
SOURCES = "sources.json"  # the input files' table (file_table), as the writer was given it
STAMP = ".verified.json"  # the shard versions whose digest was checked, by file name
LOCK = ".structkd.lock"  # the name run folders use: one structkd writer per folder
_IDS = "image_ids"  # a shard's header metadata: the image ids of its rows, in order
# (inode, size, mtime_ns, ctime_ns, sha256) of each shard this process checked, by path
_verified: dict[str, list[Any]] = {}
# A file's times are trusted to name its content once it is older than this: a write within the
# same clock tick (file systems keep times in ticks of up to 2 s) would leave them unchanged.
_RACY_NS = 2_000_000_000
_REWRITE = "run `structkd cache-teacher` again to rewrite it"
OUT_OPTION = "teacher cache out (cache-teacher --out)"  # how messages name the folder
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "int8": torch.uint8}
# int8: 8-bit codes with an affine map per (image, variant, channel) stored beside each level,
# x = min + code * scale, scale = (max - min) / 255: one byte per value plus 8 bytes per map
# (about half of float16's size), every value within scale / 2 of the teacher's (0.2% of the
# channel's range).
INT8_LEVELS = 255
_MIN, _SCALE = "::min", "::scale"


def _quantise(x: Tensor) -> dict[str, Tensor]:
    """``x`` (B, V, C, H, W) as uint8 codes and the per-(B, V, C) affine map to read them."""
    x = x.float()
    lo = x.amin(dim=(-2, -1))
    scale = (x.amax(dim=(-2, -1)) - lo) / INT8_LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant channel: code 0
    codes = ((x - lo[..., None, None]) / scale[..., None, None]).round_().clamp_(0, INT8_LEVELS)
    return {"": codes.to(torch.uint8), _MIN: lo, _SCALE: scale}


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the file's sha256 (about 1.5 GB/s from the page cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_table(paths: Sequence[str | os.PathLike],
               known: Sequence[Sequence[Any]] | None = None) -> list[list[Any]]:
    """``[path, size, mtime_ns, digest]`` of each file, in order. A file whose path, size and
    mtime equal a row of ``known`` (a table this gave before, e.g. a cache's
    :func:`read_sources`) takes that row's digest without being read: only changed files are
    hashed again (and those changed within 2 s of the table, whose mtime may hide a change)."""
    old = {row[0]: list(row) for row in known or ()}
    table = []
    for p in paths:
        path = str(p)
        st = os.stat(path)
        row = old.get(path)
        if row is None or row[1:3] != [st.st_size, st.st_mtime_ns]:
            # a file changed within the last tick may change again unseen: no mtime, re-read
            mtime = st.st_mtime_ns if time.time_ns() - st.st_mtime_ns > _RACY_NS else None
            row = [path, st.st_size, mtime, file_digest(path)]
        table.append(row)
    return table


def table_digest(table: Sequence[Sequence[Any]]) -> str:
    """One digest of a :func:`file_table`'s paths and contents, in order (a key component)."""
    text = json.dumps([[row[0], row[3]] for row in table])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_sources(root: str | os.PathLike) -> list[list[Any]] | None:
    """The input files' table a cache was written with (None: none recorded, or unreadable)."""
    try:
        table = json.loads((Path(root).expanduser() / SOURCES).read_text())
    except (OSError, ValueError):
        return None
    return table if isinstance(table, list) else None


def cache_key(*, teacher: nn.Module | str, student: nn.Module, teacher_layers: str | list[str],
              teacher_root: str, teacher_dtype: str | None, data: Mapping[str, Any],
              hflip: bool, dtype: str) -> dict[str, Any]:
    """Everything the cached levels depend on, by component (compared on open), in its JSON
    form (as the manifest holds it)."""
    key = {
        "format": FORMAT,
        "teacher": teacher if isinstance(teacher, str) else weights_fingerprint(teacher),
        "teacher_layers": [teacher_layers] if isinstance(teacher_layers, str)
        else list(teacher_layers),
        "teacher_root": teacher_root, "teacher_dtype": teacher_dtype,
        "student_transform": protocol_of(student).transform_settings(),
        "data": dict(data), "variants": ["as is", "hflip"] if hflip else ["as is"],
        "dtype": dtype,
    }
    return json.loads(json.dumps(key))


@dataclass(frozen=True)
class _Row:
    shard: int
    row: int


def _short(ids: Any) -> str:
    """A list of ids as a message shows it (the first few and the count)."""
    if not isinstance(ids, list):
        return repr(ids)
    head = ", ".join(str(i) for i in ids[:4])
    return f"[{head}{', ...' if len(ids) > 4 else ''}] ({len(ids)})"


def _safe_open(file: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:
        raise ValueError(f"teacher cache shard {file} cannot be read ({e}); {_REWRITE}") from None


def _check_shard(root: Path, entry: Mapping[str, Any], stamp: dict[str, list[Any]]) -> Any:
    """The shard of manifest ``entry``, opened, once it is known to be the file written there:
    its size, the image ids in its header, and its sha256 (skipped for a version of the file,
    (inode, size, mtime, ctime), already checked: in ``stamp`` or in this process). Raises
    naming the file; a checked version over 2 s old is added to ``stamp``."""
    file = root / entry["file"]
    if not file.is_file():
        raise FileNotFoundError(f"teacher cache shard {file} is missing; {_REWRITE}")
    st = file.stat()
    if st.st_size != entry["bytes"]:
        raise ValueError(f"teacher cache shard {file} has {st.st_size} bytes, the manifest says "
                         f"{entry['bytes']}: truncated or replaced; {_REWRITE}")
    handle = _safe_open(file)
    try:
        ids = json.loads((handle.metadata() or {}).get(_IDS, "null"))
    except ValueError:
        ids = None
    if ids != entry["image_ids"]:
        raise ValueError(f"teacher cache shard {file} holds image ids {_short(ids)}, the "
                         f"manifest {root / MANIFEST} lists {_short(entry['image_ids'])} for it: "
                         f"the manifest was edited or the shard is another cache's; {_REWRITE}")
    version = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, entry["sha256"]]
    if version not in (stamp.get(entry["file"]), _verified.get(str(file))):
        digest = file_digest(file)
        if digest != entry["sha256"]:
            raise ValueError(f"teacher cache shard {file} has sha256 {digest}..., the manifest "
                             f"says {entry['sha256']}...: damaged, or copied from another "
                             f"cache; {_REWRITE}")
        if time.time_ns() - st.st_ctime_ns > _RACY_NS:  # else a write could keep its times
            stamp[entry["file"]] = _verified[str(file)] = version
    return handle


def _read_stamp(root: Path) -> dict[str, list[Any]]:
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(root: Path, stamp: dict[str, list[Any]]) -> None:
    """Keep the checked shard versions for the next process (not where it cannot write)."""
    with contextlib.suppress(OSError):
        _atomic_write(root / STAMP, json.dumps(stamp))


class TeacherCache:
    """A finished cache, opened for reading (``TeacherCache(path)``); every shard is checked
    to be the file written there (see the module's docstring).

    ``key`` is what it was written for; :meth:`check` compares it with a run's;
    :meth:`features` gives a batch's levels by image id and variant.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a teacher cache (no {MANIFEST}); write "
                                    "one with `structkd cache-teacher`")
        try:
            m = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not a readable cache manifest ({e})") from None
        if m.get("format") != FORMAT:
            raise ValueError(f"{path}: cache format {m.get('format')!r}; this structkd reads "
                             f"format {FORMAT}: write the cache again")
        if not m.get("complete"):
            raise ValueError(f"{self.root}: the cache is incomplete ({len(m.get('shards', []))} "
                             f"of {m.get('num_shards')} shards written); run `structkd "
                             "cache-teacher` again to finish it")
        self.manifest = m
        self.key: dict[str, Any] = m["key"]
        self.levels: OrderedDict[str, LevelInfo] = OrderedDict(
            (k, LevelInfo(v["stride"], v["channels"])) for k, v in m["levels"].items())
        self.shapes = {k: tuple(v["shape"]) for k, v in m["levels"].items()}
        self.batch_shape = tuple(m["batch_shape"])
        self.image_sizes = [tuple(s) for s in m["image_size"]]
        self.variants = list(self.key["variants"])
        # The teacher family's default (root, taps) (a run that leaves them unset uses these);
        # caches written before families had adapters were torchvision's.
        defaults = m.get("teacher_defaults") or {"root": "backbone", "layers": "backbone"}
        self.teacher_defaults: tuple[str, Any] = (defaults["root"], defaults["layers"])
        self.index: dict[int, _Row] = {}
        self._handles: dict[int, Any] = {}
        stamp = _read_stamp(self.root)
        before = json.dumps(stamp)
        for s, shard in enumerate(m["shards"]):
            self._handles[s] = _check_shard(self.root, shard, stamp)
            for r, image_id in enumerate(shard["image_ids"]):
                self.index[int(image_id)] = _Row(s, r)
        if json.dumps(stamp) != before:
            _write_stamp(self.root, stamp)
        if len(self.index) != m["num_images"]:
            raise ValueError(f"{path}: its shards list {len(self.index)} distinct image ids for "
                             f"{m['num_images']} images: the manifest was edited; write the "
                             "cache again")

    @property
    def teacher_fingerprint(self) -> str:
        return str(self.key["teacher"])

    @property
    def sources(self) -> list[list[Any]] | None:
        """The input files' table the cache was written with (:func:`file_table`), if any."""
        return read_sources(self.root)

    def check(self, expected: Mapping[str, Any]) -> None:
        """Refuse a run whose setting differs from the cache's, naming each difference."""
        diffs = [f"{k}: cache {json.dumps(self.key.get(k))} vs run {json.dumps(v)}"
                 for k, v in expected.items() if k != "teacher" and self.key.get(k) != v]
        if "teacher" in expected and expected["teacher"] != self.key["teacher"]:
            diffs.insert(0, f"teacher weights: cache {self.key['teacher']} vs run "
                            f"{expected['teacher']}")
        if diffs:
            raise ValueError(f"teacher cache {self.root} was written for another setting: "
                             + "; ".join(diffs))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # file handles never travel (DDP, workers)

    def _open(self, shard: int) -> Any:
        if shard not in self._handles:
            self._handles[shard] = _safe_open(self.root / self.manifest["shards"][shard]["file"])
        return self._handles[shard]

    def features(self, keys: Sequence[tuple[int, int]], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> OrderedDict[str, Tensor]:
        """Levels ``(B, C, H, W)`` for ``keys`` = (image id, variant index) per image."""
        rows = []
        for image_id, variant in keys:
            row = self.index.get(int(image_id))
            if row is None:
                raise KeyError(f"image id {image_id} is not in the teacher cache {self.root} "
                               f"({len(self.index)} images)")
            if not 0 <= variant < len(self.variants):
                raise ValueError(f"variant {variant} of image {image_id}: the cache holds "
                                 f"{self.variants}")
            rows.append((row, variant))
        out: OrderedDict[str, Tensor] = OrderedDict()
        quantised = self.key["dtype"] == "int8"
        for level in self.levels:
            parts = [level, level + _MIN, level + _SCALE] if quantised else [level]
            read = [torch.cat([self._open(r.shard).get_slice(name)[r.row:r.row + 1, v]
                               for r, v in rows]) for name in parts]
            if quantised:
                codes, lo, scale = read
                read = [torch.addcmul(lo[..., None, None], codes.float(),
                                      scale[..., None, None])]
            out[level] = read[0].to(device=device, dtype=dtype, non_blocking=True)
        return out


def _atomic_write(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all (a temporary file of its own, then renamed:
    concurrent readers writing the stamp never share one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_writer_options(out: str | os.PathLike, *, batch_size: int,
                         shard_images: int = 256) -> Path:
    """``out`` as a path, after refusing what no cache can be written with (a file for the
    folder, a batch size or shard size under 1), before any work."""
    for name, value in (("batch_size", batch_size), ("shard_images", shard_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"teacher cache {name}={value!r} (cache-teacher "
                             f"--{name.replace('_', '-')}): expected a whole number of images, "
                             "at least 1")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        writable_dir(out, OUT_OPTION)  # refuses it, naming the option
    return path


@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[bool]:
    """Hold ``out``'s lock while writing into it; yields whether another writer held it first
    (this one then waited for it: the OS frees a dead writer's lock)."""
    from filelock import FileLock, Timeout

    path = out / LOCK
    lock = FileLock(path)
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = path.read_text().strip() or "another process"
        except OSError:
            holder = "another process"
        logger.warning("teacher cache %s: %s is writing into it; waiting for it to finish",
                       out, holder)
        lock.acquire()
        waited = True
    try:
        with contextlib.suppress(OSError):
            path.write_text(f"pid {os.getpid()} on {socket.gethostname()}")
        yield waited
    finally:
        with contextlib.suppress(OSError):
            path.write_text("")  # no owner: not a stale lock
        lock.release()


def _valid_prefix(out: Path, shards: list[dict[str, Any]]) -> tuple[int, str | None]:
    """How many of ``shards``, from the first, are the files written there; the first
    problem."""
    stamp = _read_stamp(out)
    before = json.dumps(stamp)
    try:
        for s, entry in enumerate(shards):
            try:
                _check_shard(out, entry, stamp)
            except (ValueError, FileNotFoundError) as e:
                return s, str(e)
        return len(shards), None
    finally:
        if json.dumps(stamp) != before:
            _write_stamp(out, stamp)


@torch.no_grad()
def write_teacher_cache(out: str | os.PathLike, student: nn.Module, teacher: nn.Module,
                        dataset: Any, *, key: Mapping[str, Any], teacher_layers: str |
                        list[str] = "backbone", teacher_root: str = "backbone",
                        batch_size: int = 8, shard_images: int = 256,
                        sources: Sequence[Sequence[Any]] | None = None,
                        progress: bool = True) -> TeacherCache:
    """Write the teacher's levels for every image of ``dataset`` and every variant of ``key``.

    ``dataset[i]`` gives ``(image, target)`` without augmentation (``build_transforms(False)``)
    and ``target["image_id"]``; ``student`` supplies the transform (its weights are not used);
    ``key`` comes from :func:`cache_key`; ``sources`` is the :func:`file_table` of the input
    files (kept so that runs re-hash only changed files). Shards already written for the same
    key that are still the files written there are kept. One writer at a time: a second one
    waits for the first, then reuses its cache (same key) or refuses to replace it.
    """
    out = check_writer_options(out, batch_size=batch_size, shard_images=shard_images)
    try:
        writable_dir(out, OUT_OPTION)
    except ValueError:
        existing = _complete(out, key, len(dataset))
        if existing is not None:  # a finished cache on a read-only disk is still read
            return existing
        raise
    out.mkdir(exist_ok=True)
    with _writer_lock(out) as waited:
        return _write(out, student, teacher, dataset, key=key, teacher_layers=teacher_layers,
                      teacher_root=teacher_root, batch_size=batch_size,
                      shard_images=shard_images, sources=sources, progress=progress,
                      waited=waited)


def _complete(out: Path, key: Mapping[str, Any], n: int) -> TeacherCache | None:
    """The finished cache of ``key`` over ``n`` images in ``out``, if there is one."""
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if m.get("complete") and m.get("key") == dict(key) and m.get("num_images") == n:
        return TeacherCache(out)
    return None


def _write(out: Path, student: nn.Module, teacher: nn.Module, dataset: Any, *,
           key: Mapping[str, Any], teacher_layers: str | list[str], teacher_root: str,
           batch_size: int, shard_images: int, sources: Sequence[Sequence[Any]] | None,
           progress: bool, waited: bool) -> TeacherCache:
    """:func:`write_teacher_cache` once ``out``'s lock is held."""
    dtype = CACHE_DTYPES[key["dtype"]]  # int8: codes + an affine map, by _quantise
    hflip = "hflip" in key["variants"]
    n = len(dataset)
    num_shards = -(-n // shard_images)
    path = out / MANIFEST
    manifest: dict[str, Any] = {"format": FORMAT, "key": dict(key), "complete": False,
                                "num_images": n, "num_shards": num_shards, "shards": []}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("key") == manifest["key"] and old.get("num_images") == n:
            manifest = old
            kept, problem = _valid_prefix(out, manifest["shards"])
            if problem is not None:
                logger.warning("teacher cache %s: %s; writing it and the shards after it again",
                               out, problem)
                manifest["shards"], manifest["complete"] = manifest["shards"][:kept], False
            if manifest.get("complete"):
                logger.info("teacher cache %s is complete for this setting; reusing it", out)
                return TeacherCache(out)
            logger.info("teacher cache %s: continuing after %d of %d shards", out,
                        len(manifest["shards"]), num_shards)
        elif waited and old.get("complete"):
            differs = sorted(k for k in {**old.get("key", {}), **manifest["key"]}
                             if old.get("key", {}).get(k) != manifest["key"].get(k))
            raise ValueError(f"teacher cache {out}: the writer this one waited for finished a "
                             f"cache of another setting there (differing in {', '.join(differs)})"
                             "; write this one into another folder (--out)")
        else:
            logger.info("teacher cache %s holds another setting; writing it anew", out)
    with _writing(out / SOURCES):
        _write_sources(out, sources)
    done = len(manifest["shards"])
    view = protocol_of(student)
    frozen = FrozenTeacher(teacher, root=teacher_root, layers=teacher_layers,
                           dtype=key.get("teacher_dtype"), student_norm=view.normalisation())
    t_tap = frozen.tap_for_dry_run()  # strides and widths as the Distiller measures them
    try:
        infos = measure_levels(frozen.model, t_tap, teacher_root)
    finally:
        if t_tap is not frozen.tap:
            t_tap.close()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=min(n, done * shard_images), desc="caching teacher levels",
                   unit="img")
    try:
        for s in range(done, num_shards):
            lo, hi = s * shard_images, min(n, (s + 1) * shard_images)
            levels: dict[str, list[Tensor]] = {}
            ids: list[int] = []
            for b0 in range(lo, hi, batch_size):
                samples = [dataset[i] for i in range(b0, min(hi, b0 + batch_size))]
                images = [img for img, _ in samples]
                ids += [int(t["image_id"]) for _, t in samples]
                per_variant = []
                for flip in ([False, True] if hflip else [False]):
                    # eval batching: no random choice among min sizes, no RNG drawn
                    x, sizes = view.batch_images([img.flip(-1) if flip else img
                                                  for img in images])
                    _check_geometry(manifest, x, sizes, ids[-len(images):])
                    feats = frozen.features(x, sizes)
                    per_variant.append(feats)
                for k in per_variant[0]:
                    stacked = torch.stack([f[k] for f in per_variant], dim=1)  # (B, V, C, H, W)
                    stored = (_quantise(stacked) if key["dtype"] == "int8"
                              else {"": stacked.to(dtype)})
                    for suffix, t in stored.items():
                        levels.setdefault(k + suffix, []).append(t.cpu())
                if bar is not None:
                    bar.update(len(images))
            tensors = {k: torch.cat(v).contiguous() for k, v in levels.items()}
            if "levels" not in manifest:
                manifest["levels"] = {k: {"shape": list(tensors[k].shape[2:]),
                                          "channels": infos[k].channels,
                                          "stride": infos[k].stride}
                                      for k in per_variant[0]}
            name = f"shard-{s:05d}.safetensors"
            with _writing(out / name):
                _write_shard(out, name, tensors, ids, manifest)
    finally:
        if bar is not None:
            bar.close()
    manifest["complete"] = True
    root, layers = family_defaults(teacher)
    manifest["teacher_defaults"] = {"root": root, "layers": layers}
    with _writing(path):
        _atomic_write(path, json.dumps(manifest, indent=1))
    total = sum(sh["bytes"] for sh in manifest["shards"])
    logger.info("teacher cache %s: %d images x %d variant(s), %d levels, %.1f MiB (%.1f KiB per "
                "image and variant)", out, n, len(key["variants"]), len(manifest["levels"]),
                total / 2**20, total / 1024 / max(1, n * len(key["variants"])))
    return TeacherCache(out)


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[None]:
    """A failure to write ``target`` (a full or read-only disk) as one line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        why = (e.strerror if isinstance(e, OSError) else None) or " ".join(str(e).split())
        raise ValueError(f"{OUT_OPTION}='{target.parent}': writing "
                         f"{target.name} failed ({why}); free space or choose another folder "
                         "(the shards written so far are kept: the next run continues after "
                         "them)") from None


def _write_sources(out: Path, sources: Sequence[Sequence[Any]] | None) -> None:
    if sources is None:
        (out / SOURCES).unlink(missing_ok=True)  # another setting's: not this cache's inputs
    else:
        _atomic_write(out / SOURCES, json.dumps([list(row) for row in sources]))


def _check_geometry(manifest: dict[str, Any], batch: Tensor, image_sizes: list[Any],
                    ids: list[int]) -> None:
    """Record the batch geometry once; refuse images that make another one (not exact)."""
    shape = list(batch.shape[-2:])
    sizes = [list(s) for s in image_sizes]
    if "batch_shape" not in manifest:
        manifest["batch_shape"], manifest["image_size"] = shape, [sizes[0]]
    if shape != manifest["batch_shape"] or any(s != manifest["image_size"][0] for s in sizes):
        bad = next(i for i, s in zip(ids, sizes, strict=True)
                   if s != manifest["image_size"][0] or shape != manifest["batch_shape"])
        raise ValueError(
            f"image id {bad} becomes a {sizes[ids.index(bad)]} image in a {shape} batch, the "
            f"first a {manifest['image_size'][0]} image in a {manifest['batch_shape']} batch: "
            "cached levels are exact only when every training image has one size after the "
            "student's resize (images of one size and shape, or model.min_size = "
            "model.max_size with square images); train with the live teacher instead")


def _write_shard(out: Path, name: str, tensors: dict[str, Tensor], ids: list[int],
                 manifest: dict[str, Any]) -> None:
    """One shard, whole (written beside, then renamed), its image ids in its header; then the
    manifest with its size and digest."""
    from safetensors.torch import save_file

    tmp = out / (name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={_IDS: json.dumps(ids)})
        os.replace(tmp, out / name)
    finally:
        tmp.unlink(missing_ok=True)  # a partial file on a full disk takes no more room
    manifest["shards"].append({"file": name, "image_ids": ids,
                               "bytes": (out / name).stat().st_size,
                               "sha256": file_digest(out / name)})
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
