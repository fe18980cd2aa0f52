# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Rows of a dataset as one pandas DataFrame: from a local file or folder, or from the Hugging Face Hub.

The one idea: whatever the source, a harness gets a DataFrame whose list cells are Python lists (Arrow and parquet
give numpy arrays), and can fingerprint the rows it evaluates (`data_fingerprint`, `row_fingerprint`) so that saved
results are reused only for the same data. Every loader takes a local path; the Hub loader says how to work offline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

LOCAL_FORMATS = (
    "a dataset directory saved with `datasets.save_to_disk`, a .parquet file, a .jsonl file, "
    "or a directory of .parquet/.jsonl files"
)


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
