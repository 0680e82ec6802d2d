"""What ``structkd methods``, ``models`` and ``configs`` print: the registries as text."""

from __future__ import annotations

from ..detectors import describe_families
from ..methods import describe_methods
from ..models.spec import ARCHS, BACKBONES
from ..recipes import shipped_configs

__all__ = ["configs_text", "methods_text", "models_text"]


def methods_text() -> str:
    """Each registered method: summary, paper, options with defaults, presets, aliases."""
    lines = []
    for info in describe_methods():
        lines += [f"{info.name}: {info.summary}", f"    paper:   {info.paper}",
                  "    options: " + ", ".join(f"{k}={v!r}" for k, v in info.options.items())]
        for dist, extra in info.extra_options.items():
            shown = {k: v for k, v in extra.items() if k != "check_finite"}
            lines.append(f"    options with distance={dist!r}: "
                         + ", ".join(f"{k}={v!r}" for k, v in shown.items()))
        for preset, values in info.presets.items():
            strides = info.preset_strides.get(preset)
            levels = f"; levels of strides {list(strides)}" if strides else "; every shared level"
            lines.append(f"    preset {preset}: "
                         + ", ".join(f"{k}={v:g}" for k, v in values.items()) + levels)
        if info.aliases:
            lines.append("    aliases: " + ", ".join(f"{a} = {info.name} {p}"
                                                     for a, p in info.aliases.items()))
        if info.needs_boxes:
            lines.append("    needs the ground-truth boxes")
        if info.needs_head:
            lines.append(f"    reads both detectors' heads: {info.supports}")
    lines.append("several at once: join names with '+' (distill.method=mgd+bckd), options per "
                 "method (distill.options={bckd: {loc_weight: 2.0}})")
    return "\n".join(lines)


def models_text() -> str:
    """The detector families, what builds each here and what to install for the others."""
    lines = [f"torchvision (model.family=torchvision): model.arch one of {list(ARCHS)}, "
             f"model.backbone one of {list(BACKBONES)}; a teacher may be any torchvision "
             "detection builder (--teacher retinanet_resnet50_fpn_v2)"]
    for info in describe_families():
        where = f"model.family={info.family} model.name=NAME"
        lines.append(f"{info.family} ({where}): {', '.join(info.names)} ({info.note})"
                     if info.available else
                     f"{info.family} ({where}): not installed here: {info.note}")
    return "\n".join(lines)


def configs_text() -> str:
    """The shipped configs, one per line with the first line of each file."""
    return "\n".join(f"{name:<34} {path.read_text().splitlines()[0].lstrip('# ').strip()}"
                     for name, path in sorted(shipped_configs().items()))
