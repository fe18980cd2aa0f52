# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The harness scripts start from any folder with plain absolute imports, as on the device machine:
`PYTHONPATH=<repository root> python <root>/<script> ...`, run here from a temporary directory as new processes.

Only cheap entry points are started (`--help`); the scripts' real work is tested in process elsewhere."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# script -> a string its --help prints
SCRIPTS = {
    "evaluation/evaluate.py": "Options: dataset, data_dir, model",
    "evaluation/plot.py": "results_dir",
    "evaluation/benchmarks/synthetic/create_dataset.py": "--context_lengths",
    "reference/quality.py": "--model_dir",
    "reference/train.py": "--output_dir",
}


def run_from(directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=directory, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_script_prints_its_help_from_another_directory(script, tmp_path):
    result = run_from(tmp_path, str(REPO_ROOT / script), "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert SCRIPTS[script] in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


def test_pythonpath_imports_this_checkout(tmp_path):
    """With PYTHONPATH set to the repository root, the packages come from this checkout (not from elsewhere)."""
    packages = "evaluation, harness, kvpress, reference"
    code = f"import {packages}; print(*(package.__file__ for package in ({packages})), sep=' ')"
    result = run_from(tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [Path(line) for line in result.stdout.split()]
    assert len(files) == 4 and all(file.is_relative_to(REPO_ROOT) for file in files)
