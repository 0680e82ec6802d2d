"""The teacher out of the training loop: its tapped levels written once, read by every run.

A cache holds, for every training image and every augmentation variant training can draw (the
image as it is, and mirrored when flips are on), the teacher's levels on exactly the batch the
student's transform makes of it, stored in reduced precision in safetensors shards (one
``(images, variants, C, H, W)`` tensor per level, memory-mapped on read: a step reads only its
images' rows): float16, bfloat16, float32, or int8 (8-bit codes with a min and a scale per image,
variant and channel). A manifest records what the levels depend on (the teacher's weights, its taps,
the student's transform, the data, the variants, the storage dtype): a run whose setting differs
is refused naming what differs; a missing or truncated shard names the file. Writing goes shard
by shard, each written whole or not at all, so an interrupted write continues where it stopped.

Exact only where every training image becomes a batch of one size after the student's transform
(then padding never differs between the cache and a live batch); the writer refuses otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..detectors import family_defaults
from .pairing import LevelInfo, measure_levels
from .taps import unwrap
from .teacher import FrozenTeacher, normalisation, weights_fingerprint

logger = logging.getLogger("structkd.distill")

__all__ = ["CACHE_DTYPES", "TeacherCache", "cache_key", "file_digest", "write_teacher_cache"]

FORMAT = 1
MANIFEST = "manifest.json"
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


def _transform_settings(student: nn.Module) -> dict[str, Any]:
    """What the student's transform does to an image (sizes, normalisation, padding)."""
    t = getattr(unwrap(student), "transform", None)
    if t is None or not hasattr(t, "min_size"):
        raise ValueError("a teacher cache needs a student with torchvision's transform "
                         "(GeneralizedRCNNTransform): its batches are what the cache replays")
    return {"min_size": list(t.min_size), "max_size": t.max_size,
            "size_divisible": t.size_divisible, "fixed_size": t.fixed_size,
            "normalisation": normalisation(student)}


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


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
        "student_transform": _transform_settings(student),
        "data": dict(data), "variants": ["as is", "hflip"] if hflip else ["as is"],
        "dtype": dtype,
    }
    return json.loads(json.dumps(key))


@dataclass(frozen=True)
class _Row:
    shard: int
    row: int


class TeacherCache:
    """A finished cache, opened for reading (``TeacherCache(path)``).

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
        for s, shard in enumerate(m["shards"]):
            file = self.root / shard["file"]
            if not file.is_file():
                raise FileNotFoundError(f"teacher cache shard {file} is missing")
            if file.stat().st_size != shard["bytes"]:
                raise ValueError(f"teacher cache shard {file} has {file.stat().st_size} bytes, "
                                 f"the manifest says {shard['bytes']}: truncated or replaced; "
                                 "delete it and run `structkd cache-teacher` again")
            for r, image_id in enumerate(shard["image_ids"]):
                self.index[int(image_id)] = _Row(s, r)
        self._handles: dict[int, Any] = {}

    @property
    def teacher_fingerprint(self) -> str:
        return str(self.key["teacher"])

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
            from safetensors import safe_open

            file = self.root / self.manifest["shards"][shard]["file"]
            try:
                self._handles[shard] = safe_open(str(file), framework="pt")
            except Exception as e:
                raise ValueError(f"teacher cache shard {file} cannot be read ({e}); delete it "
                                 "and run `structkd cache-teacher` again") from None
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def write_teacher_cache(out: str | os.PathLike, student: nn.Module, teacher: nn.Module,
                        dataset: Any, *, key: Mapping[str, Any], teacher_layers: str |
                        list[str] = "backbone", teacher_root: str = "backbone",
                        batch_size: int = 8, shard_images: int = 256,
                        progress: bool = True) -> TeacherCache:
    """Write the teacher's levels for every image of ``dataset`` and every variant of ``key``.

    ``dataset[i]`` gives ``(image, target)`` without augmentation (``build_transforms(False)``)
    and ``target["image_id"]``; ``student`` supplies the transform (its weights are not used);
    ``key`` comes from :func:`cache_key`. Shards already written for the same key are kept.
    """
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
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
            if manifest.get("complete"):
                logger.info("teacher cache %s is complete for this setting; reusing it", out)
                return TeacherCache(out)
            logger.info("teacher cache %s: continuing after %d of %d shards", out,
                        len(manifest["shards"]), num_shards)
        else:
            logger.info("teacher cache %s holds another setting; writing it anew", out)
    done = len(manifest["shards"])
    transform = unwrap(student).transform
    frozen = FrozenTeacher(teacher, root=teacher_root, layers=teacher_layers,
                           dtype=key.get("teacher_dtype"), student_norm=normalisation(student))
    t_tap = frozen.tap_for_dry_run()  # strides and widths as the Distiller measures them
    try:
        infos = measure_levels(frozen.model, t_tap, teacher_root)
    finally:
        if t_tap is not frozen.tap:
            t_tap.close()
    was_training = transform.training
    transform.eval()  # eval resizing: no random choice among min sizes, no RNG drawn
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
                    batch = [img.flip(-1) if flip else img for img in images]
                    image_list, _ = transform(batch)
                    _check_geometry(manifest, image_list, ids[-len(images):])
                    feats = frozen.features(image_list.tensors, image_list.image_sizes)
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
            _write_shard(out, s, tensors, ids, manifest)
    finally:
        transform.train(was_training)
        if bar is not None:
            bar.close()
    manifest["complete"] = True
    root, layers = family_defaults(teacher)
    manifest["teacher_defaults"] = {"root": root, "layers": layers}
    _atomic_write(path, json.dumps(manifest, indent=1))
    total = sum(sh["bytes"] for sh in manifest["shards"])
    logger.info("teacher cache %s: %d images x %d variant(s), %d levels, %.1f MiB (%.1f KiB per "
                "image and variant)", out, n, len(key["variants"]), len(manifest["levels"]),
                total / 2**20, total / 1024 / max(1, n * len(key["variants"])))
    return TeacherCache(out)


def _check_geometry(manifest: dict[str, Any], image_list: Any, ids: list[int]) -> None:
    """Record the batch geometry once; refuse images that make another one (not exact)."""
    shape = list(image_list.tensors.shape[-2:])
    sizes = [list(s) for s in image_list.image_sizes]
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


def _write_shard(out: Path, s: int, tensors: dict[str, Tensor], ids: list[int],
                 manifest: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    name = f"shard-{s:05d}.safetensors"
    tmp = out / (name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out / name)
    manifest["shards"].append({"file": name, "image_ids": ids,
                               "bytes": (out / name).stat().st_size})
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
