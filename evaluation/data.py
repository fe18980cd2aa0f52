# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluation data: generated synthetic rows, and the checks every dataset's rows pass before a model is loaded.

The one idea: whatever the source (a local file or the Hub, read by `harness.data`; or the synthetic generators of
`harness.synthetic.tasks`), the harness gets one pandas DataFrame with the columns every benchmark shares (`context`,
`question`, `answer_prefix`, `max_new_tokens`, plus the columns its metric reads), checked up front so that a missing
column or value is reported with its name and the file it is missing from, before any model is loaded.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from harness.synthetic import tasks as synthetic_tasks

logger = logging.getLogger(__name__)

BASE_COLUMNS = ("context", "question")


def load_synthetic(
    tasks: Optional[str],
    num_samples: int,
    context_lengths: Sequence[int],
    tokenizer,
    seed: int,
) -> pd.DataFrame:
    """Generate synthetic rows (`harness.synthetic.tasks`): `tasks` is a task name, a comma-separated
    list, `all`, or `needle_sweep` (needles at 5/50/95% depth for each context length)."""
    names = [name.strip() for name in (tasks or "all").split(",") if name.strip()]
    rows: list[dict] = []
    if names == ["needle_sweep"]:
        rows = synthetic_tasks.needle_sweep_rows(
            list(context_lengths), num_samples=num_samples, tokenizer=tokenizer, seed=seed
        )
        return pd.DataFrame(rows)
    if names == ["all"]:
        names = list(synthetic_tasks.TASK_NAMES)
    for name in names:
        if name not in synthetic_tasks.TASK_NAMES:
            raise ValueError(
                f"Unknown synthetic task {name!r}; valid tasks: {', '.join(synthetic_tasks.TASK_NAMES)}, 'all' or "
                "'needle_sweep' (pass them with --data_dir, comma-separated)."
            )
        for length in context_lengths:
            rows.extend(synthetic_tasks.generate_rows(name, num_samples, int(length), tokenizer=tokenizer, seed=seed))
    return pd.DataFrame(rows)


def check_columns(df: pd.DataFrame, required: Sequence[str], source: str, dataset: str) -> None:
    """Raise a ValueError naming the first missing column and where it is missing from."""
    for column in required:
        if column not in df.columns:
            raise ValueError(
                f"Column {column!r} is missing from {source}. Dataset {dataset!r} needs the columns "
                f"{', '.join(required)}; the data has {', '.join(map(str, df.columns)) or 'no columns'}."
            )


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _is_positive_integer(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return bool(value > 0)
    return isinstance(value, (float, np.floating)) and float(value).is_integer() and bool(value > 0)


def _row_list(row_ids: list) -> str:
    shown = ", ".join(str(row_id) for row_id in row_ids[:10])
    return shown + (f" and {len(row_ids) - 10} more" if len(row_ids) > 10 else "")


def check_rows(df: pd.DataFrame, required: Sequence[str], source: str, dataset: str) -> None:
    """Raise a ValueError naming the first row (its `row_id`, the index of the row in the data, from 0) and the
    column of the first missing or malformed value: every required column needs a value in every row, `context` is
    text and `max_new_tokens` a positive integer. Run before any model is loaded."""
    for column in required:
        if column not in df.columns:
            continue
        values = df[column]
        bad = [row_id for row_id, value in zip(df.index, values) if _is_missing(value)]
        if bad:
            hint = " or pass --max_new_tokens" if column == "max_new_tokens" else ""
            raise ValueError(
                f"Row {bad[0]} of {source} has no value in column {column!r} (rows with none: {_row_list(bad)}; "
                f"rows are counted from 0). Dataset {dataset!r} needs {', '.join(required)} in every row: fill in "
                f"the missing values{hint}."
            )
        if column == "context":
            bad = [row_id for row_id, value in zip(df.index, values) if not isinstance(value, str)]
            kind = "text"
        elif column == "max_new_tokens":
            bad = [row_id for row_id, value in zip(df.index, values) if not _is_positive_integer(value)]
            kind = "a positive integer"
        else:
            continue
        if bad:
            value = values.loc[bad[0]]
            value = value.item() if isinstance(value, np.generic) else value
            raise ValueError(
                f"Row {bad[0]} of {source} has {value!r:.60} in column {column!r}, which must be {kind} (rows "
                f"affected: {_row_list(bad)}; rows are counted from 0)."
            )
