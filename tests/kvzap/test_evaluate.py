# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""kvzap/evaluate_aime.py on the reference model with local rows: sampling-based generation under
DMSPress(KVzapPress(...), decoding=True), the harness-dataset evaluation, the command line from another folder, and
bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from kvzap.evaluate_aime import build_press, evaluate, evaluate_dataset, load_problems

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kvzap_dir(tmp_path_factory):
    """A linear KVzap model of the reference model's sizes, laid out as kvzap/train.py writes it."""
    root = tmp_path_factory.mktemp("kvzap-eval")
    torch.manual_seed(0)
    KVzapModel(KVzapConfig(input_dim=256, output_dim=2, n_modules=6)).save_pretrained(root / "linear")
    return root


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("aime") / "problems.jsonl"
    filler = "The river is wide. The hills are green. " * 20  # longer than DMSPress's 128-token window
    rows = [
        {"question": filler + "What is 2 + 3? The special magic number is", "answer": "5"},
        {"problem": "x", "question": filler + "VAR A = 12345. VAR B = VAR A. What is B?", "answer": "12345"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_aime_job_on_local_rows(problems, kvzap_dir, tmp_path):
    result = evaluate(
        "linear",
        threshold=1e9,
        model_name="reference/model",
        device="cpu",
        max_new_tokens=6,
        data_path=str(problems),
        kvzap_model_path=str(kvzap_dir),
        output_dir=str(tmp_path),
    )
    run = Path(result["output"])
    assert run.parent.name == "aime25__model__kvzap_linear__1000000000.00"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["total"] == 2 and metrics["answered"] == 0
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) == 2 and predictions["compression_ratio"].gt(0).all()
    # with decoding=True everything but the 128-token window is evicted as tokens arrive: the ratio is the masked
    # fraction of the cache at the end, below 1 and above 0
    assert 0 < metrics["compression_ratio"] < 1
    baseline = evaluate(
        "no_press",
        model_name="reference/model",
        device="cpu",
        max_new_tokens=4,
        data_path=str(problems),
        output_dir=str(tmp_path),
    )
    assert baseline["compression_ratio"] == 0.0


def test_harness_dataset_evaluation_on_synthetic_rows(kvzap_dir, tmp_path):
    result = evaluate_dataset(
        "linear",
        threshold=1e9,
        dataset="synthetic",
        data_dir="niah_single_noise",
        kvzap_model_path=str(kvzap_dir),
        device="cpu",
        rows_per_task=2,
        context_length=160,
        output_dir=str(tmp_path),
    )
    assert set(result["metric"]) == {"niah_single_noise", "all"}
    # threshold 1e9 evicts everything outside the 128-token window: (T - 128) / T for each context of T tokens
    predictions = pd.read_csv(Path(result["output"]) / "predictions.csv")
    assert len(predictions) == 2 and all(0.1 < ratio < 0.3 for ratio in predictions["compression_ratio"])


def test_command_line_runs_from_another_folder(problems, kvzap_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(REPOSITORY / "kvzap" / "evaluate_aime.py"),
        "no_press",
        "--model_name",
        "reference/model",
        "--device",
        "cpu",
        "--max_new_tokens",
        "2",
        "--data_path",
        str(problems),
        "--output_dir",
        str(tmp_path / "results"),
    ]
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    assert len(list((tmp_path / "results").glob("*/*/metrics.json"))) == 1


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="kvzap_model_type must be one of"):
        build_press("tree", 0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate("mlp", max_new_tokens=0)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        load_problems(str(tmp_path / "rows.jsonl"))
    with pytest.raises(ValueError, match="dataset must be one of"):
        evaluate_dataset("mlp", dataset="nothing")
    with pytest.raises(TypeError, match="threshold"):
        build_press("mlp", "low")
