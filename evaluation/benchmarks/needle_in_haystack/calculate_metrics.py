# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Needle-in-a-haystack metric (https://github.com/gkamradt/LLMTest_NeedleInAHaystack): ROUGE of the answer.

The one idea: the answer should repeat the needle, so each prediction is scored by its ROUGE-1/2/L overlap with the
needle (the needle is passed as the hypothesis, as upstream does: precision is the share of the needle recovered).
The metric is the list of per-row scores (upstream's metrics.json); `summary_metrics` averages the rows and reports
ROUGE-L F1 per needle depth.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd

from evaluation.benchmarks.text_normalization import mean

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")


def _zero() -> dict:
    return {key: {"r": 0.0, "p": 0.0, "f": 0.0} for key in ROUGE_KEYS}


def row_scores(needle, prediction) -> dict:
    """ROUGE scores of one row (all zero when the prediction is empty)."""
    from rouge import Rouge

    needle, prediction = str(needle).strip(), prediction.strip() if isinstance(prediction, str) else ""
    if not needle or not prediction:
        return _zero()
    try:
        return Rouge().get_scores(needle, prediction)[0]
    except (ValueError, RecursionError):
        return _zero()


def calculate_metrics(df: pd.DataFrame) -> list:
    """The per-row ROUGE scores, `[{"rouge-1": {"r", "p", "f"}, "rouge-2": ..., "rouge-l": ...}, ...]`: upstream's
    metrics.json shape, which upstream's readers load. `summary_metrics` gives the means and the per-depth view."""
    return [row_scores(n, p) for n, p in zip(df["needle"], df["predicted_answer"])]


def summary_metrics(df: pd.DataFrame) -> dict:
    """Mean ROUGE-1/2/L (`f`, `p`, `r`), ROUGE-L F1 per depth (`by_depth`) and the per-row scores (`rows`)."""
    rows = [row_scores(n, p) for n, p in zip(df["needle"], df["predicted_answer"])]
    metrics: dict = {key: {k: mean(row[key][k] for row in rows) for k in ("r", "p", "f")} for key in ROUGE_KEYS}
    if "needle_depth" in df.columns:
        by_depth = defaultdict(list)
        for depth, row in zip(df["needle_depth"], rows):
            by_depth[str(depth)].append(row["rouge-l"]["f"])
        metrics["by_depth"] = {depth: mean(values) for depth, values in by_depth.items()}
    metrics["rows"] = rows
    return metrics
