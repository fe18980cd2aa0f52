# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Headline scores of every benchmark, the summary table, and the score-vs-ratio plot of a results directory."""

import json

import matplotlib.image
import pytest
import yaml

from evaluation.plot import plot, select_runs
from evaluation.summary import collect_runs, comparison_table, format_table, headline_score, run_summary


@pytest.mark.parametrize(
    "dataset, metrics, expected",
    [
        ("ruler", {"niah_single_1": {"string_match": 80.0}, "qa_1": {"string_match": 40.0}}, 60.0),
        ("synthetic", {"niah_multikey": {"string_match": 50.0}, "all": {"string_match": 75.0}}, 75.0),
        ("longbench", 41.5, 41.5),
        ("longbench-e", {"0-4k": 10.0, "4-8k": 20.0, "8k+": 60.0}, 30.0),
        ("longbench-v2", {"average": 0.4, "easy": 0.9, "short": 0.1}, 0.4),
        ("infinitebench", {"passkey": 1.0, "kv_retrieval": 0.5, "average": 0.75}, 0.75),
        ("loogle", {"shortdep_cloze": {"exact_match": 0.2, "partial_match": 0.9}, "shortdep_qa": {"rougeL": 0.4}}, 0.3),
        ("zero_scrolls", {}, None),
        ("zero_scrolls", {"qasper": 20.0, "quality": 40.0}, 30.0),
        ("needle_in_haystack", {"rouge-l": {"f": 0.5, "p": 1.0, "r": 0.3}, "rows": []}, 0.5),
        ("needle_in_haystack", [{"rouge-l": {"f": 1.0}}, {"rouge-l": {"f": 0.0}}], 0.5),  # upstream's list
        ("aime25", {"correct": 3, "answered": 4, "accuracy": 0.75, "total": 4}, 0.75),
        ("math500", {"correct": 1, "answered": 1, "accuracy": 0.5, "total": 2}, 0.5),
    ],
)
def test_headline_scores(dataset, metrics, expected):
    assert headline_score(dataset, metrics) == (pytest.approx(expected) if expected is not None else None)


def test_tables():
    assert format_table(["a", "value"], [["x", 1.23456], ["longer", None]]) == (
        "| a      | value |\n|--------|-------|\n| x      | 1.23  |\n| longer | -     |"
    )
    text = run_summary(
        {"dataset": "ruler", "press_name": "knorm", "compression_ratio": 0.5}, {"t": {"string_match": 50}}, 7
    )
    assert "press knorm at 0.5, 7 rows" in text and "| t.string_match   | 50.00 |" in text
    assert "| score (headline) | 50.00 |" in text


def write_run(root, press, ratio, score, dataset="ruler", query_aware=False):
    run = root / f"{dataset}__{press}__{ratio}{'__qa' if query_aware else ''}"
    run.mkdir(parents=True)
    config = {"dataset": dataset, "data_dir": "4096", "model": "org/m", "press_name": press, "query_aware": query_aware}
    config["compression_ratio"] = ratio
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"shortdep_qa": {"rougeL": score}} if dataset == "loogle" else {"task": {"string_match": score}}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_plot_score_against_ratio(tmp_path, capsys):
    results = tmp_path / "results"
    write_run(results, "no_press", 0.0, 90.0)
    for ratio, score in [(0.25, 85.0), (0.5, 70.0), (0.75, 40.0)]:
        write_run(results, "knorm", ratio, score)
        write_run(results, "snapkv", ratio, score + 5, query_aware=True)
    write_run(results, "knorm", 0.5, 0.1, dataset="loogle")
    (results / "unfinished").mkdir()  # a run without metrics.json is ignored
    (results / "unfinished" / "config.yaml").write_text("dataset: ruler\n")

    runs = collect_runs(results)
    assert len(runs) == 8
    ruler_runs = select_runs(runs, dataset="ruler")
    assert sorted((r["press_name"], r["compression_ratio"], r["score"]) for r in ruler_runs)[:2] == [
        ("knorm", 0.25, 85.0),
        ("knorm", 0.5, 70.0),
    ]
    output = plot(str(results), str(tmp_path / "plot.png"), dataset="ruler")
    image = matplotlib.image.imread(output)
    assert image.shape[0] > 100 and image.shape[1] > 100  # a real PNG
    table = capsys.readouterr().out
    assert "| snapkv (query-aware) | 0.75  | 45.00 |" in table and "loogle" not in table
    two_panels = matplotlib.image.imread(plot(str(results), str(tmp_path / "all.png")))
    assert two_panels.shape[1] > image.shape[1]  # one panel per dataset
    with pytest.raises(ValueError, match="No finished run with a score under .* for dataset 'math500'"):
        plot(str(results), str(tmp_path / "none.png"), dataset="math500")


def test_comparison_table_names_each_runs_setting_and_headline(tmp_path):
    ruler = {"niah_single_1": {"string_match": 80.0}, "vt": {"string_match": 40.0}}
    runs = [
        ({"dataset": "ruler", "data_dir": "4096", "model": "m", "press_name": "no_press", "compression_ratio": 0.0},
         ruler, tmp_path / "a"),
        ({"dataset": "ruler", "data_dir": "4096", "model": "m", "press_name": "h2o", "compression_ratio": 0.0,
          "cache_budget": 256}, {"niah_single_1": {"string_match": 10.0}}, tmp_path / "b"),
        ({"dataset": "ruler", "data_dir": "4096", "model": "m", "press_name": "kvzap_mlp", "threshold": -4},
         {"niah_single_1": {"string_match": 55.5}}, tmp_path / "c"),
    ]  # fmt: skip
    lines = comparison_table(runs).splitlines()
    assert lines[0] == "dataset ruler (4096), model m: headline score by press"
    assert lines[1:6] == [
        "| press     | compression  | score |",
        "|-----------|--------------|-------|",
        "| no_press  | 0.00         | 60.00 |",  # the mean over RULER's tasks
        "| h2o       | budget 256   | 10.00 |",
        "| kvzap_mlp | threshold -4 | 55.50 |",
    ]
    assert lines[6:] == [f"results: {tmp_path / name}" for name in "abc"]
