# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""MATH-500 metric (https://arxiv.org/abs/2305.20050): exact match of the boxed answer.

The one idea: as for AIME, the final `\\boxed{...}` answer (braces balanced) is compared as a string, white space
removed, with the reference answer of the MATH-500 subset.
"""

from __future__ import annotations

import pandas as pd

from evaluation.benchmarks.aime25.calculate_metrics import boxed_accuracy


def calculate_metrics(df: pd.DataFrame) -> dict:
    """`correct`, `answered`, `accuracy` and `total` of the last boxed answer against the `answer` column."""
    return boxed_accuracy(df, which="last")
