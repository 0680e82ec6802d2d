"""The layering contracts in pyproject.toml (import-linter) hold, and they can fail: a copy of
the package with one upward import breaks exactly the contract that forbids it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdtest import REPO, SRC

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def _lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(LINT, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_hold() -> None:
    proc = _lint(SRC, REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("methods/base.py", "from ..engine import fit", "rooms import only rooms below them"),
    ("models/build.py", "from .. import __version__", "no module imports the package root"),
    ("losses/l1.py", "import torchvision", "methods and losses are pure tensor code"),
    ("distill/taps.py", "import lightning", "the wiring of a step knows nothing of Lightning"),
    ("detectors/registry.py", "from . import torchvision", "no circles"),
])
def test_an_upward_import_breaks_its_contract(tmp_path: Path, module: str, line: str,
                                              contract: str) -> None:
    shutil.copytree(SRC / "structkd", tmp_path / "src" / "structkd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "src" / "structkd" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    proc = _lint(tmp_path / "src", tmp_path)
    assert proc.returncode != 0
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout, proc.stdout[-3000:]


def test_nothing_above_the_detectors_asks_which_family() -> None:
    """Only ``structkd.detectors`` (the protocol and one module per family) and structkd's own
    torchvision builders (``models/build.py``) import torchvision's detection models or name a
    family's batching or wrapper class; every other room goes through the protocol."""
    import ast

    root = SRC / "structkd"
    allowed = {root / "models" / "build.py"}
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if root / "detectors" in path.parents or path in allowed:
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)} imports {n}" for n in names
                          if n.startswith("torchvision.models.detection")]
        offenders += [f"{path.relative_to(root)} names {word}" for word in
                      ("GeneralizedRCNNTransform", "WrappedDetector") if word in text]
    assert offenders == []
