# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""AIME 2025 metric (https://artofproblemsolving.com/wiki/index.php/2025_AIME_I): exact match of the boxed answer.

The one idea: the model writes its final answer as `\\boxed{...}`; the content of the last box (braces balanced, so
`\\boxed{\\frac{1}{2}}` reads `\\frac{1}{2}`) is compared as a string, white space removed, with the reference.
"""

from __future__ import annotations

from typing import Optional

import pandas as pd

BOX = "boxed{"


def _box_contents(text: str, start: int) -> Optional[str]:
    """The text between the `{` ending at `start` and its matching `}` (None when the box is never closed)."""
    depth = 1
    for position in range(start, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[start:position]
    return None


def extract_boxed(text, which: str = "last") -> Optional[str]:
    """The content of the first or last `boxed{...}` of `text`, or None when there is no (closed) box."""
    if not isinstance(text, str):
        return None
    position = text.rfind(BOX) if which == "last" else text.find(BOX)
    if position == -1:
        return None
    return _box_contents(text, position + len(BOX))


def normalize(answer) -> str:
    """The comparison form of an answer: its string with every white space removed."""
    return "".join(str(answer).split())


def boxed_accuracy(df: pd.DataFrame, which: str) -> dict:
    """`correct`, `answered` (predictions with a box), `accuracy` (= correct / total) and `total`."""
    predictions = list(df["predicted_answer"])
    extracted = [extract_boxed(p, which) for p in predictions]
    correct = sum(e is not None and normalize(e) == normalize(a) for e, a in zip(extracted, df["answer"]))
    answered = sum(isinstance(p, str) and BOX in p for p in predictions)
    total = len(df)
    accuracy = correct / total if total else 0.0
    return {"correct": int(correct), "answered": int(answered), "accuracy": float(accuracy), "total": total}


def calculate_metrics(df: pd.DataFrame) -> dict:
    """Accuracy of the last boxed answer against the `answer` column."""
    return boxed_accuracy(df, which="last")
