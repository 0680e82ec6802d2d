"""What makes a resumed run the same run: its identity and every random state.

A checkpoint carries, under ``"structkd"``, the run's identity (spec, label map, method and
options, levels, teacher fingerprint, training data) and the RNG states of torch, NumPy and
Python. A resume whose identity differs is refused, saying what differs; the RNG states are
restored so the remaining steps draw what an uninterrupted run would have drawn.

A checkpoint of an earlier structkd that lacks a key compared now is resumed, and the key is
named in a warning (:attr:`Resumed.unchecked`): what it does record is still checked, and
refusing would leave a run interrupted before an upgrade no way to finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..._version import __version__
from ...distill import DetectorLosses, Distiller, file_digest
from ...models import DetectorSpec

if TYPE_CHECKING:  # annotations only: runs/ sits below the Lightning pieces
    from ..training.evalinfo import EvalInfo

__all__ = ["APPLIED_ON_RESUME", "FIXED_ON_RESUME", "IDENTITY_KEYS", "Resumed", "check_resume",
           "data_identity", "resume_path", "rng_states", "run_meta", "run_options",
           "set_rng_states"]

IDENTITY_KEYS = ("spec", "class_names", "label_to_cat_id", "method", "levels", "teacher", "data")
# Options a resume may change: applied from the resumed step on (and logged).
APPLIED_ON_RESUME = ("optim.lr", "optim.momentum", "optim.weight_decay", "optim.grad_clip",
                     "schedule.preset", "schedule.epochs", "schedule.milestones",
                     "schedule.gamma", "schedule.warmup_iters", "schedule.warmup_ratio",
                     "schedule.max_steps")
# Options that make another run (the optimiser's state, the data order or the batches would
# not be this run's): a resume that changes one is refused. The precision is one: Lightning
# would restore the optimiser either way, but every step after the resume would compute in
# another dtype, so the weights could not be the uninterrupted run's, and the run's record
# (config.yaml, results.json) would name one precision for steps that ran in two.
FIXED_ON_RESUME = ("optim.name", "trainer.seed", "trainer.precision", "data.batch_size",
                   "data.limit_train", "data.hflip_prob", "data.scale_range")
# Lightning's historical spellings of a precision (``precision=32`` is "32-true"): a resume
# that spells the same precision another way is the same run.
_PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class Resumed:
    """A checkpoint a run resumes from: its step and the options the resume changes
    (key -> (checkpoint's value, now))."""

    path: Path
    step: int
    changed: dict[str, tuple[Any, Any]]
    unchecked: tuple[str, ...] = ()  # keys the checkpoint (an earlier structkd's) lacks


def run_options(sections: Any) -> dict[str, Any]:
    """The values of the options a resume compares (``section.key`` -> value), read from
    ``sections`` (section name -> option object, or a config with those sections as
    attributes); an option no section holds is left out (a ``fit`` whose augmentation lives
    in its dataset has no ``data.hflip_prob``)."""
    out = {}
    for key in (*APPLIED_ON_RESUME, *FIXED_ON_RESUME):
        section, name = key.split(".")
        holder = sections.get(section) if isinstance(sections, Mapping) else getattr(
            sections, section, None)
        if not hasattr(holder, name):
            continue
        value = getattr(holder, name)
        if key == "trainer.precision":
            value = _PRECISION_ALIASES.get(str(value), str(value))
        out[key] = list(value) if isinstance(value, tuple | list) else value
    return out


def data_identity(train: Dataset) -> dict[str, Any]:
    """What identifies a run's training data, read from the dataset object (a YAML run and a
    Python ``fit`` key it alike): for a dataset with ``ann_file`` and ``image_dir``
    (structkd's ``CocoDetection``) the sha256 of the annotation file and the image folder; a
    digest of the indices of each ``Subset`` around it; the number of images. Any other dataset
    is known by its class and length only (its content is not read)."""
    out: dict[str, Any] = {}
    inner, subsets = train, []
    while isinstance(inner, Subset):
        subsets.append(_digest([int(i) for i in inner.indices]))
        inner = inner.dataset
    ann, images = getattr(inner, "ann_file", None), getattr(inner, "image_dir", None)
    if ann is not None and images is not None:
        out["train_ann"] = file_digest(ann)
        out["train_images"] = str(Path(images).expanduser().resolve())
    else:
        out["dataset"] = f"{type(inner).__module__}.{type(inner).__qualname__}"
    try:
        out["images"] = len(train)  # type: ignore[arg-type]
    except TypeError:
        out["images"] = None
    if subsets:
        out["subsets"] = subsets
    return out


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from (torch CPU and CUDA, NumPy, Python)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {  # plain types and tensors: loadable with weights_only=True
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def run_meta(net: Distiller | DetectorLosses, spec: DetectorSpec | None,
             info: EvalInfo | None, teacher_dtype: str | None,
             options: dict[str, Any] | None = None, *,
             data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The identity of a run and its resumable options, saved in its checkpoints and compared
    on resume (``data``: the training data's :func:`data_identity`)."""
    meta: dict[str, Any] = {
        "options": dict(options or {}),
        "structkd_version": __version__,
        "spec": spec.to_dict() if spec is not None else None,
        "class_names": list(info.class_names) if info else [],
        "label_to_cat_id": {str(k): v for k, v in info.label_to_cat_id.items()} if info else {},
        "method": None, "levels": None, "teacher": None,
        "data": dict(data) if data is not None else None,
    }
    if isinstance(net, Distiller):
        meta["method"] = {"name": net.method_name,
                          "weight": "auto" if net.auto_weight else net.method.weight,
                          "options": dict(net.options)}
        meta["levels"] = [dataclasses.asdict(p) for p in net.pairs]
        meta["teacher"] = {"fingerprint": net.teacher_fingerprint(),
                           "dtype": teacher_dtype}
    return meta


def resume_path(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint ``resume`` names ("last": the run's own), checked to exist."""
    if resume is None:
        return None
    path = out_dir / "checkpoints" / "last.ckpt" if resume == "last" else \
        Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={resume!r}: checkpoint {path} does not exist")
    return path


def check_resume(path: Path, meta: Mapping[str, Any]) -> Resumed:
    """Refuse to resume ``path`` into a run that is not the same (its identity or an option of
    ``FIXED_ON_RESUME`` differs): say what differs, with both values. Returns the checkpoint's
    step, the changes of ``APPLIED_ON_RESUME`` options, which the resumed run applies, and the
    identity keys and fixed options the checkpoint does not record (an earlier structkd's)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint (loaded with weights_only=True: "
                         f"{type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    saved = ckpt.get("structkd") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a checkpoint of a structkd run (no 'structkd' entry)")
    diffs = [f"{key}: checkpoint {_text(saved[key])} vs now {_text(meta.get(key))}"
             for key in IDENTITY_KEYS if key in saved and not _same(saved[key], meta.get(key))]
    then, now = saved.get("options") or {}, meta.get("options") or {}
    diffs += [f"{key}: checkpoint {_text(then[key])} vs now {_text(now.get(key))}"
              for key in FIXED_ON_RESUME if key in then and not _same(then[key], now.get(key))]
    if diffs:
        raise ValueError(f"cannot resume {path}: it belongs to another run; "
                         + "; ".join(diffs))
    unchecked = tuple([key for key in IDENTITY_KEYS if key not in saved]
                      + [key for key in FIXED_ON_RESUME if key not in then])
    changed = {key: (then[key], now.get(key)) for key in APPLIED_ON_RESUME
               if key in then and not _same(then[key], now.get(key))}
    return Resumed(path, int(ckpt.get("global_step", 0)), changed, unchecked)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True,
                                                                     default=str)


def _text(value: Any) -> str:
    return json.dumps(value, default=str)[:300]
