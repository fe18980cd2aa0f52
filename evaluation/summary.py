# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Scores at a glance: one headline number per run, plain-text tables, and the runs of a results directory.

The one idea: every benchmark returns its own metric structure (a float, per-task dicts, ROUGE triples...); one
function reduces each to the number people compare (the mean over tasks of the benchmark's main metric), so the
progress bar, the summary table and the plots all speak of the same score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

PREFERRED_KEYS = ("all", "average", "accuracy", "string_match", "score")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def generic_score(metrics: Any) -> Optional[float]:
    """A number for any metric structure: the number itself, a preferred key, or the mean over the entries."""
    number = _number(metrics)
    if number is not None:
        return number
    if isinstance(metrics, dict):
        for key in PREFERRED_KEYS:
            if key in metrics:
                score = generic_score(metrics[key])
                if score is not None:
                    return score
        scores = [generic_score(value) for key, value in metrics.items() if key != "rows"]
        scores = [score for score in scores if score is not None]
        return sum(scores) / len(scores) if scores else None
    return None


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    numbers = [value for value in values if value is not None]
    return sum(numbers) / len(numbers) if numbers else None


def headline_score(dataset: str, metrics: Any) -> Optional[float]:
    """The number a run is compared by (None when the metrics have none, e.g. the private ZeroSCROLLS test set).

    ruler: mean string match over tasks; loogle: mean over tasks of exact match (cloze) or ROUGE-L recall;
    needle_in_haystack: mean ROUGE-L F1; aime25/math500: accuracy; longbench-v2: average accuracy; others: the
    benchmark's own number, or the mean over its tasks/buckets.
    """
    if dataset == "ruler" and isinstance(metrics, dict):
        return _mean(_number(task.get("string_match")) for task in metrics.values() if isinstance(task, dict))
    if dataset == "loogle" and isinstance(metrics, dict):
        return _mean(
            _number(task.get("exact_match", task.get("rougeL"))) for task in metrics.values() if isinstance(task, dict)
        )
    if dataset == "needle_in_haystack" and isinstance(metrics, dict) and "rouge-l" in metrics:
        return _number(metrics["rouge-l"].get("f"))
    if isinstance(metrics, (list, tuple)):  # upstream's needle metric: one ROUGE dict per row
        return _mean(_number(row.get("rouge-l", {}).get("f")) for row in metrics if isinstance(row, dict))
    return generic_score(metrics)


def flatten_metrics(metrics: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """`(dotted.name, value)` leaves of a metric structure (per-row lists are left out)."""
    if isinstance(metrics, dict):
        rows = []
        for key, value in metrics.items():
            if key == "rows":
                continue
            rows.extend(flatten_metrics(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(metrics, (list, tuple)):
        return [(prefix or "value", f"{len(metrics)} rows")]
    return [(prefix or "score", metrics)]


def format_value(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "-" if value is None else str(value)
    if abs(number) >= 1 or number == 0:
        return f"{number:.2f}"
    text = f"{number:.4f}".rstrip("0")  # small values (fractions, ratios): up to 4 decimals, at least 2
    return text + "0" * max(0, 2 - len(text.split(".")[1]))


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(cell) for cell in header]] + [[format_value(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(row) for row in cells[1:]])


def run_summary(config: dict, metrics: Any, n_rows: int, results_dir: Optional[Path] = None) -> str:
    """The table printed at the end of a run: what was run, every metric, and the headline score."""
    ratio = config.get("compression_ratio")
    if config.get("threshold") is not None:
        ratio = f"threshold {config['threshold']}"
    elif config.get("head_compression_ratio") is not None:
        ratio = f"head ratio {config['head_compression_ratio']}"
    lines = [
        f"dataset {config.get('dataset')} ({config.get('data_path') or config.get('data_dir') or 'default'}), "
        f"model {config.get('model')}, press {config.get('press_name')} at {ratio}, "
        f"{'query-aware, ' if config.get('query_aware') else ''}{n_rows} rows",
    ]
    rows: list[list[Any]] = [[name, value] for name, value in flatten_metrics(metrics)]
    rows.append(["score (headline)", headline_score(str(config.get("dataset")), metrics)])
    lines.append(format_table(["metric", "value"], rows))
    if results_dir is not None:
        lines.append(f"results: {results_dir}")
    return "\n".join(lines)


def comparison_table(runs: list[tuple[dict, Any, Path]]) -> str:
    """The table printed after several presses ran on the same data: one row per press, its ratio (or budget,
    threshold, head ratio) and its headline score, then the results folder of each run."""
    first = runs[0][0]
    lines = [
        f"dataset {first.get('dataset')} ({first.get('data_path') or first.get('data_dir') or 'default'}), "
        f"model {first.get('model')}: headline score by press"
    ]
    rows = []
    for config, metrics, _ in runs:
        if config.get("cache_budget") is not None:
            setting = f"budget {config['cache_budget']}"
        elif config.get("threshold") is not None:
            setting = f"threshold {config['threshold']}"
        elif config.get("head_compression_ratio") is not None:
            setting = f"head ratio {config['head_compression_ratio']}"
        else:
            setting = format_value(config.get("compression_ratio"))
        rows.append([config.get("press_name"), setting, headline_score(str(config.get("dataset")), metrics)])
    lines.append(format_table(["press", "compression", "score"], rows))
    lines.extend(f"results: {path}" for _, _, path in runs)
    return "\n".join(lines)


def collect_runs(results_dir: str | Path) -> list[dict]:
    """Every finished run under `results_dir` (a folder with config.yaml and metrics.json), with its score."""
    runs = []
    for metrics_path in sorted(Path(results_dir).rglob("metrics.json")):
        if any(part.startswith(".") for part in metrics_path.relative_to(results_dir).parts):
            continue  # earlier results a rerun moved aside (`.replaced/`), not a finished run
        config_path = metrics_path.with_name("config.yaml")
        if not config_path.exists():
            continue
        config = yaml.safe_load(config_path.read_text()) or {}
        metrics = json.loads(metrics_path.read_text())
        dataset = str(config.get("dataset"))
        runs.append(
            {
                "dataset": dataset,
                "data_dir": config.get("data_path") or config.get("data_dir") or "",
                "model": str(config.get("model")),
                "press_name": str(config.get("press_name")),
                "query_aware": bool(config.get("query_aware", False)),
                "compression_ratio": _run_ratio(config, metrics_path.parent),
                "score": headline_score(dataset, metrics),
                "path": str(metrics_path.parent),
            }
        )
    return runs


def _run_ratio(config: dict, run_dir: Path) -> Optional[float]:
    """The configured ratio, or for threshold/head-ratio runs the mean measured ratio of predictions.csv."""
    if config.get("press_name") == "no_press":
        return 0.0
    if config.get("threshold") is None and config.get("head_compression_ratio") is None:
        return _number(config.get("compression_ratio"))
    predictions = run_dir / "predictions.csv"
    if predictions.exists():
        import pandas as pd

        df = pd.read_csv(predictions)
        if "compression_ratio" in df.columns and df["compression_ratio"].notna().any():
            return float(df["compression_ratio"].mean())
    return _number(config.get("head_compression_ratio"))
