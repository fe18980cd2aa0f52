# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The harnesses depend one way: each imports the shared `harness` package, none imports another, and no file edits
sys.path. Imports are read from the source (every `import`, at module level or inside a function), so a cycle
cannot hide behind a lazy import."""

import ast
from pathlib import Path

import pytest

import evaluation.evaluate_registry
import harness.press_registry
from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH

REPO_ROOT = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {"build", "dist", "results", "node_modules", "__pycache__"}
# The harnesses and what each may not import. `harness` imports no harness; the library imports none of them at
# module level (it is shipped alone, as the `kvpress` wheel).
FORBIDDEN = {
    "evaluation": {"reference"},
    "reference": {"evaluation"},
    "harness": {"evaluation", "reference"},
}


def python_files(root: Path) -> list[Path]:
    """Every .py file under `root`, outside hidden folders (.venv, .git, ...) and build outputs."""
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).parts[:-1]
        if any(part.startswith(".") or part in SKIPPED_DIRS or part.startswith("venv") for part in parts):
            continue
        files.append(path)
    return files


def imported_packages(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(top-level package, line, at module level) of every absolute import in `tree`."""
    module_level = {id(node) for node in getattr(tree, "body", [])}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], node.lineno, id(node) in module_level) for name in names]
    return found


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_harness_imports_no_other_harness(package):
    assert (REPO_ROOT / package / "__init__.py").is_file()
    offending = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for path in python_files(REPO_ROOT / package)
        for name, line, _ in imported_packages(parse(path))
        if name in FORBIDDEN[package]
    ]
    assert not offending, "the dependency must run one way (through `harness`): " + "; ".join(offending)


def test_the_library_imports_no_harness_at_module_level():
    offending = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for path in python_files(REPO_ROOT / "kvpress")
        for name, line, module_level in imported_packages(parse(path))
        if module_level and name in {"harness", "evaluation", "reference"}
    ]
    assert not offending, "kvpress is shipped alone; " + "; ".join(offending)


def _touches_sys_path(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path":
            if isinstance(node.value, ast.Name) and node.value.id == "sys":
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            lines += [node.lineno for alias in node.names if alias.name == "path"]
    return lines


def test_no_python_file_touches_sys_path_or_silences_late_imports():
    late_import = "noqa: E" + "402"  # split so that this file does not match itself
    offending = []
    for path in python_files(REPO_ROOT):
        text = path.read_text(encoding="utf-8")
        offending += [f"{path.relative_to(REPO_ROOT)}:{line} uses sys.path" for line in _touches_sys_path(parse(path))]
        offending += [
            f"{path.relative_to(REPO_ROOT)}:{number} has '{late_import}'"
            for number, line in enumerate(text.splitlines(), start=1)
            if late_import in line
        ]
    assert not offending, "the editable install or PYTHONPATH puts the repository root on sys.path: " + "; ".join(
        offending
    )


def test_the_checks_see_a_forbidden_import_and_a_sys_path_edit():
    """The scanners themselves: a lazy import inside a function and `sys.path.insert` are both found."""
    tree = ast.parse(
        "import os\n\ndef f():\n    from reference.train import main\n    import sys\n    sys.path.insert(0, '.')\n"
    )
    assert ("reference", 4, False) in imported_packages(tree) and ("os", 1, True) in imported_packages(tree)
    assert _touches_sys_path(tree) == [6]
    assert _touches_sys_path(ast.parse("from sys import path\n")) == [1]


def test_upstream_import_path_of_the_press_registry_is_the_shared_registry():
    assert evaluation.evaluate_registry.PRESS_REGISTRY is harness.press_registry.PRESS_REGISTRY
    assert evaluation.evaluate_registry.PressSpec is harness.press_registry.PressSpec


def test_the_reference_model_constant_names_the_shipped_checkpoint():
    assert REFERENCE_MODEL_DIR == REPO_ROOT / "reference" / "model"
    assert (REFERENCE_MODEL_DIR / "config.json").is_file() and TRAINED_CONTEXT_LENGTH == 1024
