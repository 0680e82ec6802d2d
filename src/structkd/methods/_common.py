"""Presets: a method's per-family option values, overridden by the options given."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..checks import check_choice


def resolve_preset(presets: Mapping[str, Mapping[str, Any]], preset: str,
                   given: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's values, overridden by every option the user gave (not None)."""
    check_choice("preset", preset, list(presets))
    out = dict(presets[preset])
    out.update({k: v for k, v in given.items() if v is not None})
    return out
