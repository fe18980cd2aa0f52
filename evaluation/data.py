# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluation data: rows from the Hugging Face Hub, from a local file or directory, or generated synthetic tasks.

The one idea: whatever the source, the harness gets one pandas DataFrame with the columns every benchmark shares
(`context`, `question`, `answer_prefix`, `max_new_tokens`, plus the columns its metric reads), checked up front so
that a missing column is reported with its name and the file it is missing from, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

LOCAL_FORMATS = (
    "a dataset directory saved with `datasets.save_to_disk`, a .parquet file, a .jsonl file, "
    "or a directory of .parquet/.jsonl files"
)
BASE_COLUMNS = ("context", "question")


def _listify(value):
    """Arrow and parquet give list cells as numpy arrays; the metrics expect lists."""
    if isinstance(value, np.ndarray):
        return [_listify(item) for item in value.tolist()]
    return value


def normalize_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Turn numpy-array cells of object columns into (nested) lists."""
    df = df.copy()
    for column in df.columns:
        if df[column].dtype == object:
            df[column] = [_listify(value) for value in df[column]]
    return df


def read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line; values are kept as JSON parsed them (no type guessing)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error}).") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line_number}: each line must be a JSON object, got {record!r:.80}.")
            records.append(record)
    return pd.DataFrame.from_records(records)


def _read_saved_dataset(path: Path) -> pd.DataFrame:
    from datasets import Dataset, DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "test" in dataset:
            dataset = dataset["test"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise ValueError(f"{path} holds the splits {sorted(dataset)}; the harness reads the 'test' split.")
    assert isinstance(dataset, Dataset)
    return dataset.to_pandas()


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    raise ValueError(f"Unsupported data file {path}: pass {LOCAL_FORMATS}.")


def load_local_dataset(path: Union[str, Path]) -> pd.DataFrame:
    """Rows from a local dataset: a saved `datasets` directory, a parquet or jsonl file, or a folder of them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"The local dataset {path} does not exist. Pass {LOCAL_FORMATS}.")
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            df = _read_saved_dataset(path)
        else:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".jsonl"))
            if not files:
                raise ValueError(f"{path} is a directory without a saved dataset or .parquet/.jsonl files.")
            df = pd.concat([_read_file(file) for file in files], ignore_index=True)
    else:
        df = _read_file(path)
    return normalize_cells(df.reset_index(drop=True))


def load_hub_dataset(hub_id: str, data_dir: Optional[str]) -> pd.DataFrame:
    """The "test" split of a Hugging Face Hub dataset (needs the network, or the datasets cache)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(hub_id, data_dir=data_dir, split="test")
    except Exception as error:  # noqa: BLE001 - offline, unknown id, missing data_dir: all need the same hint
        raise RuntimeError(
            f"Could not load the 'test' split of {hub_id} (data_dir={data_dir!r}) from the Hugging Face Hub: {error}. "
            f"Without network access, save the dataset once elsewhere (datasets.load_dataset(...).save_to_disk(dir)) "
            "and pass --data_path dir."
        ) from error
    return normalize_cells(dataset.to_pandas().reset_index(drop=True))


def load_synthetic(
    tasks: Optional[str],
    num_samples: int,
    context_lengths: Sequence[int],
    tokenizer,
    seed: int,
) -> pd.DataFrame:
    """Generate synthetic rows (`evaluation.benchmarks.synthetic.tasks`): `tasks` is a task name, a comma-separated
    list, `all`, or `needle_sweep` (needles at 5/50/95% depth for each context length)."""
    try:
        from evaluation.benchmarks.synthetic import tasks as synthetic_tasks
    except ModuleNotFoundError as error:
        raise RuntimeError(
            "The synthetic task generators (evaluation/benchmarks/synthetic/tasks.py) are not available in this "
            "version; pass --data_path with a local file of synthetic rows instead."
        ) from error
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


def _json_value(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def data_fingerprint(df: pd.DataFrame) -> str:
    """A hash of the rows a run evaluates (every column of every row, in order), stored with the results so that a
    finished run is reused only for the same data."""
    columns = sorted(map(str, df.columns))
    digest = hashlib.sha256(json.dumps(columns).encode("utf-8"))
    for record in df.rename(columns=str)[columns].to_dict("records"):
        line = json.dumps(record, sort_keys=True, default=_json_value, ensure_ascii=False)
        digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()[:16]


def row_fingerprint(context: str, question: str, answer_prefix: str) -> str:
    """A short hash of what a row asks, so resumed results are matched to the same rows."""
    digest = hashlib.sha1(f"{context}\x00{question}\x00{answer_prefix}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]
