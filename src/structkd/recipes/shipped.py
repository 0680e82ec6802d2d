"""The recipes shipped inside the package (``structkd/configs/*.yaml``), by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["resolve_config_path", "shipped_configs"]


def shipped_configs() -> dict[str, Path]:
    """Configs shipped inside the package, by name (file stem)."""
    root = resources.files("structkd") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(name: str | None) -> Path | None:
    """A file path, or the name of a shipped config (``structkd configs`` lists them)."""
    if name is None:
        return None
    p = Path(name)
    if p.is_file():
        return p
    shipped = shipped_configs()
    if name in shipped:
        return shipped[name]
    raise FileNotFoundError(
        f"config {name!r} is neither a file nor a shipped config; shipped: {sorted(shipped)}"
    )
