# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Our results files read the way upstream's plot and leaderboard code reads a results folder: the folder name's
first five `__` parts are dataset, data_dir, model, press and ratio; `config.yaml` holds upstream's keys;
`metrics.json` has upstream's shape per benchmark (RULER per task, needle a list of per-row ROUGE dicts, one-task
InfiniteBench and LongBench a float, AIME/MATH a dict with `accuracy`); `predictions.csv` has upstream's columns
(ours adds `row_id`). The differences that stay are pinned here and listed in the evaluation README."""

import json

import pandas as pd
import pytest
import yaml

from evaluation.benchmarks.aime25.calculate_metrics import calculate_metrics as aime_metrics
from evaluation.benchmarks.infinite_bench.calculate_metrics import calculate_metrics as infinitebench_metrics
from evaluation.benchmarks.math500.calculate_metrics import calculate_metrics as math_metrics
from evaluation.benchmarks.needle_in_haystack.calculate_metrics import calculate_metrics as needle_metrics
from evaluation.evaluate import EvaluationConfig, EvaluationRunner
from tests.fixtures import saved_model_dir

ROWS = [
    {"context": "The magic number of the red door is 4821. " * 3, "question": "Red door number?", "answer": ["4821"]},
    {"context": "Alice keeps the key under the blue stone. " * 3, "question": "Where is the key?", "answer": ["blue"]},
]
for row in ROWS:
    row.update(answer_prefix="Answer:", task="niah_single_1", max_new_tokens=3)
UPSTREAM_CONFIG_KEYS = ("dataset", "data_dir", "model", "press_name", "compression_ratio", "query_aware")
UPSTREAM_PREDICTION_COLUMNS = ("question", "answer_prefix", "answer", "task", "max_new_tokens", "predicted_answer")


def upstream_read(run_dir):
    """A results folder as upstream's readers take it apart."""
    dataset, data_dir, model, press, ratio = run_dir.name.split("__")[:5]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = pd.read_csv(run_dir / "predictions.csv")
    return (
        dict(dataset=dataset, data_dir=data_dir, model=model, press=press, ratio=float(ratio)),
        config,
        metrics,
        (predictions),
    )


@pytest.fixture(scope="module")
def ruler_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream_readers")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = EvaluationConfig(
        dataset="ruler",
        data_path=str(data),
        model=saved_model_dir("llama"),
        press_name="knorm",
        compression_ratio=0.25,
        output_dir=str(root / "results"),
        model_kwargs={"dtype": "float32"},
        progress=False,
        max_samples=2,
    )
    EvaluationRunner(config).run_evaluation()
    return config.get_results_dir()


def test_the_folder_name_starts_with_upstreams_five_parts(ruler_run):
    parts, config, _, _ = upstream_read(ruler_run)
    assert parts == dict(dataset="ruler", data_dir="rows", model=parts["model"], press="knorm", ratio=0.25)
    assert config["press_name"] == parts["press"] and config["compression_ratio"] == parts["ratio"]
    # Our suffixes come after the five parts (here `max_samples2`), where upstream puts its own (`query_aware`, ...).
    assert ruler_run.name.split("__")[5:] == ["max_samples2"]


def test_config_yaml_holds_upstreams_keys(ruler_run):
    _, config, _, _ = upstream_read(ruler_run)
    assert all(key in config for key in UPSTREAM_CONFIG_KEYS)
    assert config["press_init_command"].startswith("KnormPress(compression_ratio=0.25")


def test_ruler_metrics_average_as_upstream_averages_them(ruler_run):
    _, _, metrics, predictions = upstream_read(ruler_run)
    average = sum(task["string_match"] for task in metrics.values()) / len(metrics)
    assert set(metrics) == {"niah_single_1"} and 0 <= average <= 100
    assert all(column in predictions.columns for column in UPSTREAM_PREDICTION_COLUMNS)
    assert list(predictions["compression_ratio"]) == [0.25, 0.25]
    assert list(predictions["row_id"]) == [0, 1]  # the one extra column (resume key)
    assert "context" not in predictions.columns


def test_needle_metrics_are_upstreams_list_of_rouge_dicts():
    df = pd.DataFrame(
        {"needle": ["The secret is 42.", "The secret is 42."], "predicted_answer": ["The secret is 42.", "no"],
         "needle_depth": [10, 90]}
    )  # fmt: skip
    metrics = json.loads(json.dumps(needle_metrics(df)))  # as written to and read from metrics.json
    assert isinstance(metrics, list) and len(metrics) == 2
    rouge_l = [row["rouge-l"]["f"] for row in metrics]  # upstream's reader: one ROUGE dict per row
    assert rouge_l[0] == pytest.approx(1.0, abs=1e-6) and rouge_l[1] == 0.0
    assert set(metrics[0]) == {"rouge-1", "rouge-2", "rouge-l"}


def test_one_task_infinitebench_is_a_float_as_upstream():
    df = pd.DataFrame({"task": ["passkey"] * 2, "answer": [["123"], ["456"]], "predicted_answer": ["123", "7"]})
    score = infinitebench_metrics(df)
    assert isinstance(score, float) and score == 0.5
    # Several tasks at once (upstream fails): one score per task and their unweighted mean.
    both = pd.concat([df, df.assign(task="number_string")], ignore_index=True)
    assert infinitebench_metrics(both) == {"number_string": 0.5, "passkey": 0.5, "average": 0.5}


def test_boxed_answers_are_compared_without_white_space():
    """Kept and documented: upstream compares `str(answer)` exactly, so `\\boxed{ 42 }` and `\\boxed{x = 1}` against
    `x=1` were wrong there; white space is removed on both sides here (and the box's braces are balanced)."""
    predictions = ["so \\boxed{ 42 }", "\\boxed{x = 1}", "\\boxed{\\frac{1}{2}}"]
    df = pd.DataFrame({"answer": ["42", "x=1", "\\frac{1}{2}"], "predicted_answer": predictions})
    for metrics in (aime_metrics(df), math_metrics(df)):
        assert metrics == {"correct": 3, "answered": 3, "accuracy": 1.0, "total": 3}
