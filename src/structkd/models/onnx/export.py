"""Writing a detector as ONNX, and the metadata stored with it.

Export uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), the path
torchvision writes its detectors' ONNX support for and tests (``test/test_onnx.py``); it needs no
``onnxscript``. Checked with torch 2.14, torchvision 0.29 and onnxruntime 1.32: RetinaNet, FCOS
and Faster R-CNN match PyTorch within 1e-4 px (boxes) and 1e-5 (scores); the v2 variants,
GroupNorm/frozen-BN and MobileNetV3 students export too. By default the input size is fixed (the
size the model was trained at: its spec's ``min_size``, square); ``dynamic=True`` exports
symbolic ``H``/``W`` instead (torchvision's in-graph resize then handles any size).

Detectors of other families wrapped by structkd (transformers' DETR family, Ultralytics' YOLO and
RT-DETR) export the same way, at a fixed input size: the wrapper's resize, the model, its
post-processing (top-k, or for YOLO a traceable form of Ultralytics' NMS selection) and the
resize back are traced into one graph with the same inputs and outputs. Checked in ONNX Runtime
against PyTorch (tests/detectors): RT-DETR, D-FINE, DETR, Deformable DETR; Ultralytics' RT-DETR,
YOLOv8 and YOLO26 (with and without its NMS-free head). A model whose selection is tied
(RT-DETR at random init scores every encoder position alike) gives the same scores but may
pick other boxes of equal score.

Only a bare detector is exported: a distillation wrapper, teacher weights or modules its spec
does not build (adapters) are refused. The label map (``class_names``, ``label_to_cat_id``), the
spec and the export's meta data are stored as JSON in the ONNX model's ``metadata_props`` (key
``"structkd"``) and in a sidecar ``<path>.json`` (e.g. ``student.onnx.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from ..._version import __version__
from ...checks import writable_file
from ...detectors import class_count, protocol_of
from ...labels import default_class_names
from ..spec import DetectorSpec, as_spec

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "METADATA_KEY", "ONNX_FORMAT", "OUTPUT_NAMES",
           "default_image_size", "export_onnx", "export_run", "read_onnx_metadata"]

ONNX_FORMAT = "structkd-onnx-detector"
METADATA_KEY = "structkd"
DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")
# Input sides an export accepts: below 32 px the FPN's last levels vanish; above 8192 px one
# image's tensors alone take gigabytes (the exporter's trace would run out of memory first).
SIZE_RANGE = (32, 8192)


class _Deployed(nn.Module):
    """One image in, ``(boxes, scores, labels)`` out, in this order for every architecture
    (Faster R-CNN's own output dict has another key order)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def _as_hw(image_size: int | Sequence[int], argument: str = "image_size") -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        hw: tuple[Any, ...] = (image_size, image_size)
    elif isinstance(image_size, Sequence) and not isinstance(image_size, str) and \
            len(image_size) == 2:
        hw = tuple(image_size)
    else:
        hw = ()
    low, high = SIZE_RANGE
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high
                           for v in hw):
        raise ValueError(f"{argument}={image_size!r} is invalid; expected an int in [{low}, "
                         f"{high}] (square) or a pair (height, width) of such ints")
    return int(hw[0]), int(hw[1])


def default_image_size(model: nn.Module, spec: DetectorSpec | None = None) -> tuple[int, int]:
    """The size a detector sees after its own resize: a square of its ``min_size`` (the spec's,
    else the detector's batching), capped at ``max_size``."""
    if spec is not None:
        side = min(spec.min_size, spec.max_size)
        return side, side
    size = protocol_of(model).export_size()
    if size is None:
        raise ValueError(f"model of type {type(model).__name__} has no known input size; "
                         "pass image_size")
    return size


def _check_exportable(model: nn.Module) -> None:
    """Only a bare detector (no distillation wrapper, teacher or adapters) whose protocol says
    it can be exported."""
    name = type(model).__name__
    if hasattr(model, "student") or "distill" in name.lower():
        raise ValueError(f"model is a {name} (a distillation wrapper holding a teacher); "
                         "expected the student detector only, e.g. export_onnx(distiller.student, "
                         "...) or a structkd export loaded with load_detector")
    protocol_of(model).check_exportable()
    teacher = [k for k, _ in model.named_modules() if "teacher" in k.lower().split(".")[-1]]
    teacher += [k for k in model.state_dict() if "teacher" in k.lower()]
    if teacher:
        raise ValueError(f"model has teacher modules or weights ({sorted(set(teacher))[:3]}...); "
                         "expected the student detector only")


def _check_against_spec(model: nn.Module, spec: DetectorSpec) -> None:
    """The state dict must be exactly the spec's detector: no adapters or extra heads."""
    from ..build import build_detector

    reference = build_detector(dataclasses.replace(spec, weights=None, backbone_weights=None))
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        extra = sorted(set(have) - set(want))[:3]
        missing = sorted(set(want) - set(have))[:3]
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:3]
        raise ValueError(f"model does not match its spec (arch={spec.arch!r}, backbone="
                         f"{spec.backbone!r}): unexpected {extra} (adapters?), missing {missing}, "
                         f"differing shapes {shapes}; expected the plain student detector")


def _label_map(meta: Mapping[str, Any], class_names: Sequence[str] | None,
               label_to_cat_id: Mapping[Any, Any] | None, num_classes: int | None
               ) -> tuple[list[str], dict[str, int]]:
    names = [str(n) for n in (class_names if class_names is not None
                              else meta.get("class_names") or [])]
    l2c_in = label_to_cat_id if label_to_cat_id is not None else meta.get("label_to_cat_id")
    if not names and num_classes:
        names = default_class_names(num_classes)
    if num_classes and len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries, the model {num_classes} classes "
                         "(background at label 0 included)")
    if l2c_in:
        l2c = {str(int(k)): int(v) for k, v in dict(l2c_in).items()}
    else:
        l2c = {str(i): i for i in range(1, len(names))}
    return names, l2c


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """The tracer's warnings about torchvision's shape arithmetic are expected (torchvision
    writes those paths for ONNX export); keep them out of the user's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int | Sequence[int] | None = None,
    meta: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    label_to_cat_id: Mapping[Any, Any] | None = None,
    spec: DetectorSpec | Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = False,
) -> Path:
    """Write ``model`` (a torchvision RetinaNet / FCOS / Faster R-CNN, or a detector of another
    family wrapped by structkd) as ONNX at ``path``.

    Args:
        model: the bare detector, e.g. ``distiller.student`` or ``load_detector(...)[0]``. A
            distillation wrapper, a model with teacher weights or with modules its spec does
            not build (adapters) is refused with ``ValueError``. Its train/eval mode and device
            are restored afterwards; the export runs on CPU in eval mode.
        image_size: the input size, ``N`` (square) or ``(H, W)``; default the square of the
            spec's ``min_size`` (the size the model resizes to anyway).
        meta: meta data to store, e.g. the ``meta`` of a ``student.json``; ``class_names`` and
            ``label_to_cat_id`` are read from it unless given explicitly. Without any, labels
            map to themselves and get names ``class_1..``.
        spec: the detector's spec; default ``model.structkd_spec`` (set by ``build_detector``).
        opset: ONNX opset (11 or later; torchvision's detectors need 11+).
        dynamic: export symbolic height/width instead of the fixed ``image_size`` (torchvision
            detectors only).

    Returns the path. Also writes ``<path>.json`` with the metadata stored in the model
    (``metadata_props["structkd"]``): format, label map, spec, meta, input and output layout.
    """
    import onnx

    _check_exportable(model)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 11:
        raise ValueError(f"opset={opset!r} is invalid; expected an int >= 11 (torchvision's "
                         "detectors need opset 11 or later)")
    if spec is None:
        spec = getattr(model, "structkd_spec", None)
    spec = as_spec(spec).resolved() if spec is not None else None
    if spec is not None:
        _check_against_spec(model, spec)
    hw = _as_hw(image_size) if image_size is not None else default_image_size(model, spec)
    meta = dict(meta or {})
    names, l2c = _label_map(meta, class_names, label_to_cat_id, class_count(model))
    path = writable_file(path, "--onnx")

    view = protocol_of(model)
    if dynamic and not view.dynamic_export:
        raise ValueError(f"dynamic=True: a {type(model).__name__} ({view.adapter} family) is "
                         "exported at one fixed input size (its anchors and query positions are "
                         "traced as constants); pass image_size instead")
    arch = spec.arch if spec is not None else view.arch_name()
    document: dict[str, Any] = {
        "format": ONNX_FORMAT,
        "arch": arch,
        "class_names": names,
        "label_to_cat_id": l2c,
        "spec": (dataclasses.replace(spec, weights=None, backbone_weights=None).to_dict()
                 if spec is not None else None),
        "meta": meta,
        "input": {"name": INPUT_NAME, "shape": [3, *hw], "dynamic": bool(dynamic),
                  "dtype": "float32", "range": [0.0, 1.0], "layout": "RGB, CHW, one image"},
        "outputs": {"boxes": "float32 (N, 4) x1 y1 x2 y2 in input pixels",
                    "scores": "float32 (N,)",
                    "labels": "int64 (N,) contiguous labels 1..K (label_to_cat_id maps them)"},
        "opset": opset,
        "structkd_version": __version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
    }
    text = json.dumps(document, sort_keys=True, default=str)

    was_training = model.training
    device = next(iter(model.parameters()), torch.empty(0)).device
    wrapper = _Deployed(model.to("cpu").eval())
    example = torch.rand(3, *hw, generator=torch.Generator().manual_seed(0))
    dynamic_axes = {name: {0: "detections"} for name in OUTPUT_NAMES}
    if dynamic:
        dynamic_axes[INPUT_NAME] = {1: "height", 2: "width"}
    # Written under temporary names and renamed once whole: a failed export (no space left,
    # an export error) leaves no truncated file at ``path`` and keeps an earlier one intact.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_sidecar = _sidecar(tmp)
    try:
        try:
            with _quiet_tracing(), torch.no_grad():
                torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False,
                                  opset_version=opset, input_names=[INPUT_NAME],
                                  output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic_axes,
                                  do_constant_folding=True)
        except OSError:
            raise
        except Exception as e:
            raise RuntimeError(f"ONNX export of {type(model).__name__} ({arch}) failed: "
                               f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        finally:
            model.to(device).train(was_training)
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, text
        proto.doc_string = f"structkd {arch} detector: {INPUT_NAME} (3,H,W) in [0,1] -> " \
                           + ", ".join(OUTPUT_NAMES)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        tmp_sidecar.write_text(json.dumps(document, indent=2, sort_keys=True, default=str)
                               + "\n")
        os.replace(tmp, path)
        os.replace(tmp_sidecar, _sidecar(path))
    except OSError as e:
        raise ValueError(f"--onnx {path}: cannot write the ONNX file ({e.strerror or e}); no "
                         "partial file was left there") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)
    return path


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The structkd metadata stored in an ONNX file by :func:`export_onnx`."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ValueError(f"{path} holds no structkd metadata (metadata_props[{METADATA_KEY!r}]); "
                     "was it written by structkd.models.onnx.export_onnx?")


def export_run(run_dir_or_prefix: str | os.PathLike, onnx_path: str | os.PathLike,
               image_size: int | Sequence[int] | None = None, *, opset: int = DEFAULT_OPSET,
               dynamic: bool = False) -> Path:
    """Export a structkd run's student as ONNX.

    ``run_dir_or_prefix``: a run directory holding ``student.safetensors`` + ``student.json``,
    an export prefix (``RUN/student``, or either of its files), or a run's ``.ckpt``. The student
    is rebuilt from its spec alone (no teacher, no adapters) and written with its label map.
    ``image_size`` defaults to the spec's ``min_size`` (square).
    """
    writable_file(onnx_path, "--onnx")  # checked before any work
    if image_size is not None:
        _as_hw(image_size, "--size")
    from ..load import load_detector

    source = Path(run_dir_or_prefix).expanduser()
    if source.is_dir():
        prefix = source / "student"
        if not prefix.with_name("student.safetensors").is_file():
            raise FileNotFoundError(f"{source} holds no student.safetensors; expected a run "
                                    "directory of `structkd train/distill` or an export prefix")
        source = prefix
    model, info = load_detector(source)
    meta = {**info.meta, "source": str(source)}
    return export_onnx(model, onnx_path, image_size=image_size, meta=meta,
                       class_names=info.class_names or None,
                       label_to_cat_id=info.label_to_cat_id or None, spec=info.spec,
                       opset=opset, dynamic=dynamic)
