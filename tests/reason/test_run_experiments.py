# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""reason/run_experiments.sh: the tiny offline sweep (evaluate.py and plot.py as scripts, from another directory),
and the paper's sweep as a dry run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "reason" / "run_experiments.sh"


def script(tmp_path, *args, **env):
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )


def test_tiny_sweep_runs_offline_and_plots(tmp_path):
    out = tmp_path / "results"
    done = script(tmp_path, "--tiny", PRESSES="knorm", BUDGETS="64", OUTPUT_DIR=str(out), HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(path.parent for path in out.rglob("metrics.json"))
    assert [run.name.split("__")[3:5] for run in runs] == [["full", "budget0"], ["knorm", "budget64"]]
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        lines = (run / "predictions.jsonl").read_text().splitlines()
        assert metrics["num_samples"] == len(lines) == 2
    assert done.stdout.count("s/sample") == 2  # one score table per run
    table = pd.read_csv(out / "sweep.csv")
    assert sorted(table["press_name"]) == ["full", "knorm"]
    assert (out / "sweep.png").stat().st_size > 0


def test_paper_sweep_dry_run(tmp_path):
    done = script(tmp_path, "--dry-run", NUM_GPUS="4", MODEL="org/model")
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    evaluations = [line for line in commands if "evaluate.py" in line]
    assert len(evaluations) == 11 * (1 + 5 * 4)  # datasets x (baseline + presses x budgets)
    assert all(line.startswith("+ accelerate launch --num_processes 4 ") for line in evaluations)
    assert all(
        "--max_new_tokens 2048 --num_samples 100" in line and "--model org/model" in line for line in evaluations
    )
    budgets = {line.split("--cache_budget ")[1].split()[0] for line in evaluations}
    assert budgets == {"0", "128", "256", "384", "512"}
    assert commands[-1].split()[2].endswith("plot.py")


def test_unknown_argument(tmp_path):
    done = script(tmp_path, "--fast")
    assert done.returncode == 2 and "--tiny" in done.stderr
