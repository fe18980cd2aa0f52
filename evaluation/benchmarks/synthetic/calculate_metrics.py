# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Metric of the synthetic tasks: RULER's string matching (https://arxiv.org/abs/2404.06654).

The one idea: an answer is as right as the fraction of its expected strings that appear in the prediction
(`harness.synthetic.scoring.row_score`: case-insensitive, after stripping control characters), averaged over rows
and given in percent, per task; "all" averages the tasks. Rows of the needle sweep (columns `context_length` and
`depth`) are also scored per length and depth.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from harness.synthetic.scoring import clean_prediction, row_score

__all__ = ["calculate_metrics", "clean_prediction", "row_score"]


def calculate_metrics(df: pd.DataFrame) -> dict:
    """`{task: {"string_match": percent}, ..., "all": {"string_match": mean over tasks}}`.

    Needs the columns `predicted_answer`, `answer` (a list of strings, or one string) and `task`. When the rows also
    have `context_length` and `depth` (the needle sweep), adds `"by_context_length_and_depth": {length: {depth:
    percent}}` (keys as strings, so the result is JSON-ready).
    """
    missing = [column for column in ("predicted_answer", "answer", "task") if column not in df.columns]
    if missing:
        raise ValueError(f"calculate_metrics needs the columns predicted_answer, answer and task; missing: {missing}.")
    if len(df) == 0:
        raise ValueError("calculate_metrics got no rows.")
    scores = pd.Series(
        [row_score(p, a) for p, a in zip(df["predicted_answer"], df["answer"])], index=df.index, dtype=float
    )
    result: dict[str, Any] = {}
    for task, task_scores in scores.groupby(df["task"], sort=True):
        result[str(task)] = {"string_match": round(100 * float(task_scores.mean()), 2)}
    result["all"] = {"string_match": round(sum(v["string_match"] for v in result.values()) / len(result), 2)}
    if "context_length" in df.columns and "depth" in df.columns:
        sweep: dict[str, dict[str, float]] = {}
        for (length, depth), cell in scores.groupby([df["context_length"], df["depth"]], sort=True):
            sweep.setdefault(str(int(length)), {})[f"{float(depth):g}"] = round(100 * float(cell.mean()), 2)
        result["by_context_length_and_depth"] = sweep
    return result
