# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Real two-process data-parallel runs of `evaluation/evaluate.py` on CPU (torchrun, gloo): one result folder, the
one-process predictions and metrics, and a resume after one worker is SIGKILLed mid-run."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures import saved_model_dir
from tests.harness.torchrun import run_script

# Six contexts, the first with two questions: 7 rows, 6 pipeline calls (3 per process).
FACTS = [
    ("The magic number of the red door is 4821. ", "Red door number?", "4821"),
    ("Alice keeps the key under the blue stone. ", "Where is the key?", "blue"),
    ("The train to Oslo leaves at 7 in the morning. ", "When?", "7"),
    ("Bob painted the fence green last summer. ", "Which colour?", "green"),
    ("The lighthouse keeper owns three cats. ", "How many cats?", "three"),
    ("Our meeting moved to room 12 on Tuesday. ", "Which room?", "12"),
]
ROWS = [{"context": c * 3, "question": q, "answer": [a]} for c, q, a in FACTS]
ROWS.insert(1, {"context": FACTS[0][0] * 3, "question": "Which door?", "answer": ["red"]})
for row in ROWS:
    row.update(answer_prefix="Answer:", task="niah_single_1", max_new_tokens=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path, saved_model_dir("llama")


def arguments(inputs, output_dir) -> list[str]:
    data_path, model_dir = inputs
    return [
        "--dataset", "ruler", "--data_path", str(data_path), "--model", model_dir, "--press_name", "knorm",
        "--compression_ratio", "0.5", "--model_kwargs", '{"dtype": "float32"}', "--progress", "False",
        "--output_dir", str(output_dir),
    ]  # fmt: skip


def result_dir(output_dir: Path) -> Path:
    (folder,) = [path for path in output_dir.iterdir() if path.is_dir()]  # one result folder, whatever the ranks
    return folder


def check_ok(completed):
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, inputs):
    output_dir = tmp_path_factory.mktemp("one_process")
    check_ok(run_script("evaluation/evaluate.py", arguments(inputs, output_dir), nproc=1))
    return result_dir(output_dir)


def same_results(folder: Path, reference: Path) -> None:
    predictions = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    assert list(predictions["row_id"]) == list(range(len(ROWS)))  # every row once, in order
    assert (folder / "predictions.csv").read_text() == (reference / "predictions.csv").read_text()
    assert json.loads((folder / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert not (folder / "partial").exists()  # the shards were merged and removed


def test_two_processes_give_the_one_process_results(tmp_path, inputs, one_process):
    completed = run_script("evaluation/evaluate.py", arguments(inputs, tmp_path), nproc=2)
    check_ok(completed)
    folder = result_dir(tmp_path)
    assert folder.name == one_process.name
    same_results(folder, one_process)
    assert completed.stdout.count("results: ") == 1  # only the main process reports


def test_a_killed_worker_resumes_without_loss_or_duplicates(tmp_path, inputs, one_process):
    killed = run_script("evaluation/evaluate.py", arguments(inputs, tmp_path), nproc=2, kill_rank=1, kill_after=1)
    assert killed.returncode != 0
    folder = result_dir(tmp_path)
    assert not (folder / "metrics.json").exists() and not (folder / "predictions.csv").exists()
    saved = [json.loads(line) for line in (folder / "partial" / "rank1.jsonl").read_text().splitlines()]
    assert [record["row_id"] for record in saved] == [2]  # rank 1's first context, saved before the kill

    resumed = run_script("evaluation/evaluate.py", arguments(inputs, tmp_path), nproc=2)
    check_ok(resumed)
    assert "Resuming" in resumed.stderr
    same_results(folder, one_process)


def test_a_two_process_run_killed_resumes_in_one_process(tmp_path, inputs, one_process):
    """The shards of a killed two-process run are read by a one-process rerun (another number of processes)."""
    killed = run_script("evaluation/evaluate.py", arguments(inputs, tmp_path), nproc=2, kill_rank=1, kill_after=1)
    assert killed.returncode != 0
    check_ok(run_script("evaluation/evaluate.py", arguments(inputs, tmp_path), nproc=1))
    same_results(result_dir(tmp_path), one_process)
