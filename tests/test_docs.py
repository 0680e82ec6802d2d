"""The documentation as a whole: every code block of the README and of ``docs/*.md`` has its
test (most run in ``tests/test_readme.py``; the set-up and development commands, which are the
CI run and the demo themselves, are checked here against ``.ci/run``, the CLI's parser and the
scripts), every ``structkd ...`` and ``python benchmarks/...`` command the text names has the
options it shows, the README stays one screen and its links resolve."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

import test_readme
from test_readme import DOCS, README, ROOT, _block, blocks, pages, sections

CI = ROOT / ".ci" / "run"
BENCHMARKS = ROOT / "benchmarks"

# (page, section heading, language, index among that section's blocks of the language) -> the
# test that runs or checks the block. A new block needs a test and a line here.
EXAMPLES = {
    ("README.md", "structkd", "bash", 0): "test_docs.py::test_setup_commands",
    ("README.md", "Distil your own torchvision model in 10 lines", "python", 0):
        "test_readme.py::test_distil_your_own_torchvision_model",
    ("cli.md", "Your data on the command line", "bash", 0):
        "test_readme.py::test_your_data_on_the_command_line",
    ("cli.md", "Your data on the command line", "yaml", 0):
        "test_readme.py::test_your_data_on_the_command_line",
    ("python-api.md", "In your own training loop", "python", 0):
        "test_readme.py::test_in_your_own_training_loop",
    ("python-api.md", "With your own Lightning Trainer", "python", 0):
        "test_readme.py::test_with_your_own_lightning_trainer",
    ("methods.md", "Add your own method", "python", 0): "test_readme.py::test_add_your_own_method",
    ("families.md", "The DETR family of transformers", "python", 0):
        "test_readme.py::test_other_families_transformers",
    ("families.md", "The DETR family of transformers", "bash", 0):
        "test_readme.py::test_other_families_transformers_cli",
    ("families.md", "YOLO (Ultralytics)", "python", 0):
        "test_readme.py::test_other_families_ultralytics",
    ("families.md", "Inside Ultralytics' own trainer", "python", 0):
        "test_readme.py::test_inside_ultralytics_own_trainer",
    ("families.md", "A torchvision COCO detector as the teacher", "bash", 0):
        "test_readme.py::test_torchvision_coco_teacher_cli",
    ("families.md", "A torchvision COCO detector as the teacher", "python", 0):
        "test_readme.py::test_torchvision_coco_teacher_python",
    ("compare.md", "Does it help on my data?", "bash", 0):
        "test_readme.py::test_does_it_help_on_my_data",
    ("compare.md", "Does it help on my data?", "python", 0):
        "test_readme.py::test_does_it_help_on_my_data",
    ("development.md", "Layout", "text", 0): "test_docs.py::test_layout_names_existing_files",
    ("development.md", "Commands", "bash", 0): "test_docs.py::test_development_commands",
}


def _all_blocks() -> dict[tuple[str, str, str, int], str]:
    found = {}
    for page in pages():
        for heading, text in sections(page).items():
            seen: dict[str, int] = {}
            for lang, code in blocks(text):
                i = seen[lang] = seen.get(lang, -1) + 1
                found[page.name, heading, lang, i] = code
    return found


def test_every_code_block_has_a_test() -> None:
    found = _all_blocks()
    assert set(found) == set(EXAMPLES), (
        f"blocks without a test: {sorted(set(found) - set(EXAMPLES))}; "
        f"listed but gone: {sorted(set(EXAMPLES) - set(found))}")
    modules = {"test_readme.py": test_readme, "test_docs.py": sys.modules[__name__]}
    for where in set(EXAMPLES.values()):
        module, name = where.split("::")
        assert callable(getattr(modules[module], name, None)), where


def _text_without_blocks(page: Path) -> str:
    return re.sub(r"^```.*?^```[ \t]*$", "", page.read_text(), flags=re.S | re.M)


def _inline_commands(prefix: str) -> list[tuple[str, list[str]]]:
    """Every inline code span of the README and the pages that starts with ``prefix``."""
    out = []
    for page in pages():
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", _text_without_blocks(page)):
            span = " ".join(span.split())
            if span.startswith(prefix):
                out.append((page.name, shlex.split(span)))
    return out


def _subcommands() -> dict[str, set[str]]:
    """``{subcommand: its option strings}`` of ``structkd``'s parser."""
    import argparse

    from structkd.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def _check_structkd_command(words: list[str], where: str) -> None:
    """The command exists, knows each of its flags, and each config-key flag
    (``--optim.lr 0.02``) is a key of the schema whose value fits its type."""
    from structkd.cli import CONFIG_COMMANDS, split_key_flags
    from structkd.config import parse_flags
    from structkd.recipes.schema import Config

    commands = _subcommands()
    assert words[0] == "structkd" and len(words) > 1, where
    assert words[1] in commands, f"{where}: no command {words[1]!r} in `{shlex.join(words)}`"
    words, keys = split_key_flags(words)
    if keys:
        assert words[1] in CONFIG_COMMANDS, f"{where}: {words[1]} takes no {keys[0]}"
        parse_flags(Config, keys)
    for w in words[2:]:
        if w.startswith("-"):
            flag = w.split("=", 1)[0]
            assert flag in commands[words[1]], f"{where}: {flag} in `{shlex.join(words)}`"


def _check_benchmark_command(words: list[str], where: str) -> None:
    """``python benchmarks/X.py ...``: the script exists and knows every option and value."""
    assert words[0] == "python", where
    script = ROOT / words[1]
    assert script.parent == BENCHMARKS and script.is_file(), f"{where}: {words[1]}"
    source = script.read_text() + (BENCHMARKS / "common.py").read_text()
    for w in words[2:]:
        if w.startswith("-"):
            assert f'"{w}"' in source, f"{where}: {words[1]} has no option {w}"
        elif "/" not in w and not re.fullmatch(r"[\d.]+", w):
            assert f'"{w}"' in source, f"{where}: {words[1]} does not know {w!r}"


def test_commands_in_the_text_exist() -> None:
    """`structkd CMD --flag ...` and `python benchmarks/X.py --flag ...` named in the text
    (beside the figures they measured) parse: the command exists and has those options."""
    named = _inline_commands("structkd ")
    assert len(named) > 20
    for page, words in named:
        _check_structkd_command(words, page)
    scripts = _inline_commands("python benchmarks/")
    assert {w[1] for _, w in scripts} >= {"benchmarks/loss_speed.py",
                                          "benchmarks/step_overhead.py",
                                          "benchmarks/throughput.py", "benchmarks/balance.py",
                                          "benchmarks/ssim_recompiles.py"}
    for page, words in scripts:
        _check_benchmark_command(words, page)


def _ci_lines() -> list[str]:
    return [ln.strip() for ln in CI.read_text().splitlines()]


def test_setup_commands() -> None:
    """The README's two set-up commands: the demo is a command of the CLI, and the test command
    is what CI runs (``.ci/run``, in a fresh virtual environment with the dev extra)."""
    (install_demo, install_test) = _block("structkd", "bash").strip().splitlines()
    demo = [c.strip() for c in install_demo.split("#")[0].split("&&")]
    assert demo[0] == "pip install -e ."
    _check_structkd_command(shlex.split(demo[1]), "README.md")
    test = [c.strip() for c in install_test.split("#")[0].split("&&")]
    assert test[0] == 'pip install -e ".[dev]"'
    assert 'python -m pip install --quiet -e ".[dev]"' in _ci_lines()
    for command in test[1:]:
        assert command in _ci_lines(), f"{command!r} is not what .ci/run runs"


def test_development_commands() -> None:
    """The development commands name what exists: the dev extra, CI's commands (tests and the
    documentation's strict build), ruff's folders, the benchmark scripts and their options."""
    dev = re.search(r"^dev = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(),
                    flags=re.S | re.M).group(1)  # the dev extra (no tomllib before 3.11)
    ci = CI.read_text()
    for line in _block("Commands", "bash").strip().splitlines():
        for command in line.split("#")[0].split("&&"):
            words = shlex.split(command)
            text = " ".join(words)
            if words[:3] == ["python", "-m", "venv"] or words[0] == ".":
                continue
            if words[:3] == ["pip", "install", "-e"]:
                assert words[3] == ".[dev]"
                assert all(f'"{tool}' in dev for tool in ("pytest", "mkdocs-material",
                                                          "mkdocstrings[python]"))
            elif words[0] == "lint-imports":
                assert "lint-imports" in _ci_lines()
            elif words[:3] == ["python", "-m", "pytest"]:
                assert words[3:] in ([], ["-q"], ["-m", "not slow", "-n", "2", "--dist",
                                                  "loadfile", "-q"]), text
                if "not slow" in words:
                    assert 'python -m pytest -m "not slow" -n 2 --dist loadfile -q' in ci
            elif words[:2] == ["mkdocs", "build"]:
                assert "mkdocs build --strict" in ci and "--strict" in words
            elif words[:2] == ["ruff", "check"]:
                assert all((ROOT / d).is_dir() for d in words[2:])
            elif words[0] == "python" and words[1].startswith("benchmarks/"):
                _check_benchmark_command(words, "development.md")
            else:
                pytest.fail(f"development.md: no check for `{text}`")


def test_layout_names_existing_files() -> None:
    """Every room and every ``name.py`` the layout draws exists in ``src/``."""
    layout = _block("Layout", "text")
    rooms = re.split(r"^(?=structkd/)", layout, flags=re.M)
    assert len(rooms) > 10
    for entry in filter(None, rooms):
        path = ROOT / "src" / entry.split()[0]
        assert path.exists(), f"development.md's layout names {entry.split()[0]}"
        where = path if path.is_dir() else path.parent
        for name in re.findall(r"(?<![\w*/.{,])(\w+\.py)\b", entry):
            assert path.name == name or list(where.rglob(name)), (
                f"development.md's layout names {name} in {entry.split()[0]}")


def test_readme_is_one_screen_and_its_links_resolve() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)\s]+)\)", _text_without_blocks(README))
    assert {"docs/demo.md", "docs/detections.png", "docs/reference/index.md"} <= set(links)
    for target in links:
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target.split("#")[0]).exists(), f"README links to {target}"
    for page in sorted(DOCS.glob("*.md")):
        for target in re.findall(r"\]\(([^)\s]+)\)", _text_without_blocks(page)):
            if not re.match(r"[a-z]+://", target) and not target.startswith("#"):
                assert (DOCS / target.split("#")[0]).exists(), f"{page.name} links to {target}"
