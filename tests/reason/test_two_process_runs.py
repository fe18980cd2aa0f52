# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Real two-process data-parallel runs of `reason/evaluate.py` on CPU (torchrun, gloo), on the shipped reference
model: one result folder, the one-process predictions and metrics, and a resume after one worker is SIGKILLed."""

import json
from pathlib import Path

import pytest

from reason.shared import REFERENCE_MODEL_DIR, synthetic_rows
from tests.harness.torchrun import run_script

SAMPLES = 4


def untimed(record: dict) -> dict:
    """A record or the metrics without the wall-clock measurements (they differ between any two runs)."""
    return {key: value for key, value in record.items() if "time" not in key and "per_second" not in key}


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    path = tmp_path_factory.mktemp("data") / "vt128.jsonl"
    rows = synthetic_rows("variable_tracking", SAMPLES, 128, tokenizer=tokenizer, seed=5)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def arguments(data_path, output_dir) -> list[str]:
    return [
        "--dataset", "synthetic", "--data_path", str(data_path), "--press_name", "knorm", "--cache_budget", "64",
        "--max_new_tokens", "8", "--num_samples", str(SAMPLES), "--progress", "False", "--output_dir", str(output_dir),
    ]  # fmt: skip


def run_dir(output_dir: Path) -> Path:
    (folder,) = [path for path in output_dir.iterdir() if path.is_dir()]  # one result folder, whatever the ranks
    return folder


def check_ok(completed):
    assert completed.returncode == 0, completed.stderr[-4000:]


def predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_path):
    output_dir = tmp_path_factory.mktemp("one_process")
    check_ok(run_script("reason/evaluate.py", arguments(data_path, output_dir), nproc=1))
    return run_dir(output_dir)


def same_results(folder: Path, reference: Path) -> None:
    rows = predictions(folder)
    assert [row["sample_id"] for row in rows] == list(range(SAMPLES))  # every sample once, in order
    assert [untimed(row) for row in rows] == [untimed(row) for row in predictions(reference)]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert untimed(metrics) == untimed(json.loads((reference / "metrics.json").read_text()))
    assert not list(folder.glob("predictions.rank*.jsonl"))  # merged and removed


def test_two_processes_give_the_one_process_results(tmp_path, data_path, one_process):
    completed = run_script("reason/evaluate.py", arguments(data_path, tmp_path), nproc=2)
    check_ok(completed)
    folder = run_dir(tmp_path)
    assert folder.name == one_process.name
    same_results(folder, one_process)
    assert completed.stdout.count("results: ") == 1  # only the main process reports


def test_a_killed_worker_resumes_without_loss_or_duplicates(tmp_path, data_path, one_process):
    killed = run_script("reason/evaluate.py", arguments(data_path, tmp_path), nproc=2, kill_rank=1, kill_after=1)
    assert killed.returncode != 0
    folder = run_dir(tmp_path)
    assert not (folder / "metrics.json").exists()
    saved = [json.loads(line) for line in (folder / "predictions.rank1.jsonl").read_text().splitlines()]
    assert [record["sample_id"] for record in saved] == [1]  # rank 1's first sample, saved before the kill

    resumed = run_script("reason/evaluate.py", arguments(data_path, tmp_path), nproc=2)
    check_ok(resumed)
    assert "Resuming" in resumed.stderr
    same_results(folder, one_process)


def test_a_two_process_run_killed_resumes_in_one_process(tmp_path, data_path, one_process):
    killed = run_script("reason/evaluate.py", arguments(data_path, tmp_path), nproc=2, kill_rank=1, kill_after=1)
    assert killed.returncode != 0
    check_ok(run_script("reason/evaluate.py", arguments(data_path, tmp_path), nproc=1))
    same_results(run_dir(tmp_path), one_process)
