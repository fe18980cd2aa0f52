# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""LongBench v2 metric (https://arxiv.org/abs/2412.15204): multiple-choice accuracy.

The one idea: the model is asked to answer `The correct answer is (X)`; a prediction is right when it contains that
sentence with the right letter (with or without parentheses, markdown `*` removed). Accuracy is reported overall, per
difficulty and per length group.
"""

from __future__ import annotations

import pandas as pd


def is_correct(prediction, answer) -> bool:
    """Whether the prediction states the right choice letter."""
    if not isinstance(prediction, str):
        return False
    prediction = prediction.replace("*", "")
    letter = str(answer).strip()
    return f"The correct answer is ({letter})" in prediction or f"The correct answer is {letter}" in prediction


def calculate_metrics(df: pd.DataFrame) -> dict:
    """`{"average": accuracy, <difficulty>: accuracy, <length>: accuracy}` (fractions in [0, 1]).

    Uses the columns `predicted_answer`, `answer` (a letter), and `difficulty` and `length` when present.
    """
    correct = pd.Series([is_correct(p, a) for p, a in zip(df["predicted_answer"], df["answer"])], index=df.index)
    metrics = {"average": float(correct.mean())}
    for column in ("difficulty", "length"):
        if column in df.columns:
            for group, values in correct.groupby(df[column], sort=True):
                metrics[str(group)] = float(values.mean())
    return metrics
