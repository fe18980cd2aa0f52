# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RULER metric (https://arxiv.org/abs/2404.06654): string matching of the reference outputs in the prediction.

The one idea: a retrieval answer is right when the expected strings appear in the generated text (case-insensitive).
Tasks whose name starts with `qa` score the best single reference found (`string_match_part`); every other task
scores the fraction of its references that were found (`string_match_all`). Scores are percentages.
"""

from __future__ import annotations

import re
from typing import Sequence

import pandas as pd

from evaluation.benchmarks.text_normalization import as_list

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction) -> str:
    """Strip, drop control characters (newlines included), strip again. Missing predictions become ''."""
    if not isinstance(prediction, str):
        return ""
    return _CONTROL_CHARACTERS.sub("", prediction.strip()).strip()


def string_match_part(predictions: Sequence[str], references: Sequence) -> float:
    """Mean over rows of 1 if any reference occurs in the prediction (case-insensitive), in percent (2 decimals)."""
    hits = [
        max(str(ref).lower() in pred.lower() for ref in as_list(refs)) for pred, refs in zip(predictions, references)
    ]
    return round(100 * sum(hits) / len(hits), 2)


def string_match_all(predictions: Sequence[str], references: Sequence) -> float:
    """Mean over rows of the fraction of references that occur in the prediction, in percent (2 decimals)."""
    scores = []
    for pred, refs in zip(predictions, references):
        refs = as_list(refs)
        scores.append(sum(str(ref).lower() in pred.lower() for ref in refs) / len(refs))
    return round(100 * sum(scores) / len(scores), 2)


def calculate_metrics(df: pd.DataFrame) -> dict:
    """`{task: {"string_match": score}}` from the columns `task`, `answer` (list of strings), `predicted_answer`."""
    predictions = [postprocess_prediction(p) for p in df["predicted_answer"]]
    scores = {}
    for task, index in df.groupby("task", sort=True).indices.items():
        task_predictions = [predictions[i] for i in index]
        task_references = [df["answer"].iloc[i] for i in index]
        metric = string_match_part if str(task).split("_")[0] == "qa" else string_match_all
        scores[task] = {"string_match": metric(task_predictions, task_references)}
    return scores
