"""Build transformers DETR-family detectors offline: from a model type and a size (random
weights, no pretrained backbone), from a local ``from_pretrained`` folder, or from a hub name
(online users; offline it fails at once with what to do instead)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .registry import Adapter, register_adapter
from .transformers import TransformersDetector, is_transformers_detector

logger = logging.getLogger("structkd.detectors")

__all__ = ["TRANSFORMERS_TYPES", "transformers_detector"]

# model type -> (config class, model class, backbone kind); the backbone kinds below.
TRANSFORMERS_TYPES: dict[str, tuple[str, str, str]] = {
    "rt_detr": ("RTDetrConfig", "RTDetrForObjectDetection", "resnet"),
    "rt_detr_v2": ("RTDetrV2Config", "RTDetrV2ForObjectDetection", "resnet"),
    "d_fine": ("DFineConfig", "DFineForObjectDetection", "hgnetv2"),
    "detr": ("DetrConfig", "DetrForObjectDetection", "detr"),
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection", "detr"),
    "deformable_detr": ("DeformableDetrConfig", "DeformableDetrForObjectDetection", "detr"),
}
# size -> (backbone widths of stages 1-4, blocks per stage, hidden width, decoder layers)
_SIZES: dict[str, tuple[list[int], list[int], int, int]] = {
    "tiny": ([32, 64, 128, 256], [1, 1, 1, 1], 64, 2),
    "small": ([64, 128, 256, 512], [2, 2, 2, 2], 128, 3),
}


def _import() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"the transformers family needs the transformers package ({e}): pip "
                          "install 'structkd[transformers]'") from None
    return transformers


def _backbone_config(kind: str, widths: list[int], depths: list[int]) -> Any:
    transformers = _import()

    stages = ["stage2", "stage3", "stage4"]
    if kind == "resnet":
        return transformers.RTDetrResNetConfig(
            layer_type="basic", embedding_size=widths[0], hidden_sizes=widths, depths=depths,
            downsample_in_bottleneck=False, out_features=stages)
    half = [max(8, w // 2) for w in widths]
    return transformers.HGNetV2Config(
        stem_channels=[3, half[0], half[0]], stage_in_channels=[half[0], *widths[:3]],
        stage_mid_channels=half, stage_out_channels=widths, stage_num_blocks=depths,
        stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[2, 2, 2, 2],
        hidden_sizes=widths, out_features=stages)


def _config(model_type: str, num_labels: int, size: str, queries: int) -> Any:
    transformers = _import()

    if size not in _SIZES:
        raise ValueError(f"size={size!r}; expected one of {sorted(_SIZES)}")
    config_cls, _, kind = TRANSFORMERS_TYPES[model_type]
    widths, depths, hidden, layers = _SIZES[size]
    if kind == "detr":  # DETR-like: a transformers ResNet (no timm, nothing downloaded)
        backbone = transformers.ResNetConfig(
            embedding_size=widths[0], hidden_sizes=widths, depths=depths, layer_type="basic",
            out_features=["stage2", "stage3", "stage4"])
        extra = ({"num_feature_levels": 3, "encoder_n_points": 2, "decoder_n_points": 2}
                 if model_type == "deformable_detr" else {})
        return getattr(transformers, config_cls)(
            use_timm_backbone=False, backbone=None, backbone_config=backbone,
            use_pretrained_backbone=False, d_model=hidden, encoder_layers=1,
            decoder_layers=layers, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
            encoder_attention_heads=4, decoder_attention_heads=4, num_labels=num_labels,
            num_queries=queries, **extra)
    return getattr(transformers, config_cls)(
        backbone_config=_backbone_config(kind, widths, depths), use_pretrained_backbone=False,
        encoder_in_channels=widths[1:], encoder_hidden_dim=hidden, d_model=hidden,
        decoder_in_channels=[hidden] * 3, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
        decoder_layers=layers, num_labels=num_labels, num_queries=queries)


def transformers_detector(name: str | os.PathLike, num_classes: int, *, size: str = "tiny",
                          num_queries: int = 100, trust_checkpoint: bool = False,
                          **options: Any) -> TransformersDetector:
    """A transformers detector in structkd's calling convention.

    Args:
        name: a model type (``"rt_detr"``, ``"rt_detr_v2"``, ``"d_fine"``, ``"detr"``,
            ``"conditional_detr"``, ``"deformable_detr"``: built from a config of ``size``,
            random weights, nothing downloaded), a local folder written by
            ``save_pretrained`` (its head is re-sized to ``num_classes`` if it differs), or a
            hub name such as ``"PekingU/rtdetr_r18vd"`` (downloaded by transformers when online).
        num_classes: structkd's count, background included (K + 1 for K object classes).
        size: "tiny" (about 1-2 M parameters) or "small" (about 5-9 M), for built models.
        num_queries: object queries of a built model.
        trust_checkpoint: run the modelling code a folder or hub model ships with
            (transformers' ``trust_remote_code``; logged). Weights are read from safetensors
            or with ``weights_only=True`` either way: a pickled ``pytorch_model.bin`` never
            runs code.
        **options: :class:`TransformersDetector`'s (``min_size``, ``max_size``, ...).
    """
    transformers = _import()

    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}; expected an int >= 2 (background + "
                         "at least one class)")
    labels = num_classes - 1
    text = os.fspath(name)
    if text in TRANSFORMERS_TYPES:
        model_cls = getattr(transformers, TRANSFORMERS_TYPES[text][1])
        model: nn.Module = model_cls(_config(text, labels, size, num_queries))
        return TransformersDetector(model, **options)
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"{local} has no config.json; expected a folder written by "
                             "save_pretrained")
        model = _from_pretrained(transformers, str(local), labels, trust=trust_checkpoint)
        return TransformersDetector(model, **options)
    if local.suffix or text.startswith((".", "/", "~")):
        raise ValueError(f"{text!r} is not a folder; expected a save_pretrained folder, a hub "
                         f"name or one of the model types {sorted(TRANSFORMERS_TYPES)}")
    try:
        model = _from_pretrained(transformers, text, labels, local_only=not _hub_reachable(),
                                 trust=trust_checkpoint)
    except OSError as e:
        raise ValueError(
            f"could not load {text!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); offline, pass a local save_pretrained folder or "
            f"build one from a model type: {sorted(TRANSFORMERS_TYPES)}") from None
    return TransformersDetector(model, **options)


def _from_pretrained(transformers: Any, where: str, labels: int,
                     local_only: bool = True, trust: bool = False) -> nn.Module:
    if trust:
        logger.warning("%s: loaded with trust_checkpoint=True (transformers' trust_remote_code: "
                       "the modelling code it ships runs)", where)
    # weights_only: a pickled pytorch_model.bin is read without running code; no remote code
    # unless the user vouches for it.
    try:
        saved = transformers.AutoConfig.from_pretrained(
            where, local_files_only=local_only, trust_remote_code=trust).num_labels
        model, info = transformers.AutoModelForObjectDetection.from_pretrained(
            where, num_labels=labels, ignore_mismatched_sizes=True, local_files_only=local_only,
            weights_only=True, trust_remote_code=trust, output_loading_info=True)
    except Exception as e:  # transformers' own errors: OSError, SafetensorError, pickle's, ...
        if isinstance(e, OSError) and not Path(where).exists():
            raise  # a hub name: the caller explains the offline case
        first = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(f"{where}: not a loadable save_pretrained folder ({type(e).__name__}: "
                         f"{first})") from None
    missing = list(info.get("missing_keys") or [])
    if missing:  # transformers would initialise them at random and carry on
        raise ValueError(f"{where}: its weights lack {len(missing)} of the model's tensors (e.g. "
                         f"{missing[0]!r}): they belong to another architecture or are "
                         "incomplete")
    if saved != labels:
        logger.warning("%s has %d classes, the data %d: its class head is new, for %d classes "
                       "(every other weight loaded)", where, saved, labels, labels)
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection (offline, transformers would retry for half a
    minute before failing; this decides in seconds and then uses the local cache only)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _names() -> list[str]:
    _import()
    return [*TRANSFORMERS_TYPES, "<hub name, e.g. PekingU/rtdetr_r18vd>"]


def _claims(name: str) -> bool:
    """A model type, a save_pretrained folder (not a structkd run folder), or a hub name
    (``org/model`` where no local folder ``org`` exists: a path to a missing file stays a
    path)."""
    path = Path(name).expanduser()
    if name in TRANSFORMERS_TYPES:
        return True
    if path.is_dir():
        return (path / "config.json").is_file() and not (path / "student.json").is_file()
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not path.suffix
            and not name.startswith((".", "/", "~")) and not path.parent.exists())


register_adapter(Adapter(
    "transformers", is_transformers_detector, TransformersDetector,
    install="pip install 'structkd[transformers]'", build=transformers_detector, names=_names,
    random_weights=lambda name: str(name) in TRANSFORMERS_TYPES,  # folders and hub names load
    claims=_claims))
