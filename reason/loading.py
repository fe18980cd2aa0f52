# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Rows of a reasoning dataset: from the Hugging Face Hub, from a local path, or generated (the synthetic task).

The one idea: whatever the source, the harness gets a list of plain-Python rows (numpy arrays and Arrow structs
turned into lists and dicts), checked for the dataset's columns before any model is loaded, then sampled the
fork's way (shuffle with the seed, take the first N, or a fraction).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Optional

import numpy as np

from reason.benchmarks import Benchmark
from reason.shared import read_jsonl

logger = logging.getLogger(__name__)

LOCAL_FORMATS = "a .jsonl or .parquet file, a directory of them, or a dataset directory saved with save_to_disk"


def plain(value):
    """`value` with numpy arrays and scalars turned into lists and Python scalars, inside dicts and lists too."""
    if isinstance(value, np.ndarray):
        return [plain(item) for item in value.tolist()]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _records(df) -> list[dict]:
    return [{str(key): plain(value) for key, value in record.items()} for record in df.to_dict("records")]


def _read_saved(path: Path, split: str) -> list[dict]:
    from datasets import Dataset, DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split in dataset:
            dataset = dataset[split]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise ValueError(f"{path} holds the splits {sorted(dataset)}, not {split!r}; pass --data_split.")
    if not isinstance(dataset, Dataset):
        raise ValueError(f"{path} is not a saved dataset.")
    return _records(dataset.to_pandas())


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        return _records(pd.read_parquet(path))
    if suffix in (".jsonl", ".json"):
        return _records(read_jsonl(path))
    raise ValueError(f"Unsupported data file {path}: pass {LOCAL_FORMATS}.")


def load_local(path, split: str) -> list[dict]:
    """Rows of a local dataset (see LOCAL_FORMATS); `split` picks the split of a saved DatasetDict."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"The local dataset {path} does not exist. Pass {LOCAL_FORMATS}.")
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return _read_saved(path, split)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".jsonl"))
        if not files:
            raise ValueError(f"{path} is a directory without a saved dataset or .parquet/.jsonl files.")
        return [row for file in files for row in _read_file(file)]
    return _read_file(path)


def load_hub(benchmark: Benchmark, split: str) -> list[dict]:
    """Rows of the dataset's Hub id (needs the network or the datasets cache)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(benchmark.hub_id, benchmark.subset, split=split)
    except Exception as error:  # noqa: BLE001 - offline, unknown id: the same hint
        raise RuntimeError(
            f"Could not load split {split!r} of {benchmark.hub_id} (subset {benchmark.subset!r}) from the Hugging "
            f"Face Hub: {error}. Without network access, save it elsewhere once (datasets.load_dataset(...)"
            ".save_to_disk(dir)) and pass --data_path dir."
        ) from error
    return _records(dataset.to_pandas())


def load_rows(
    benchmark: Benchmark,
    data_path: Optional[str] = None,
    data_split: Optional[str] = None,
    num_generated: int = 10,
    seed: int = 42,
    tokenizer=None,
) -> tuple[list[dict], str]:
    """(rows, source): from `data_path`, else generated (a dataset without Hub id, `num_generated` rows), else the
    Hub. Every row is checked for the dataset's columns."""
    split = data_split or benchmark.split
    if data_path is not None:
        rows, source = load_local(data_path, split), str(data_path)
    elif benchmark.make_rows is not None:
        rows, source = benchmark.make_rows(num_generated, seed, tokenizer), f"generated {benchmark.name}"
    else:
        rows, source = load_hub(benchmark, split), f"{benchmark.hub_id} ({split})"
    if not rows:
        raise ValueError(f"{source} has no rows.")
    for index, row in enumerate(rows):
        missing = [column for column in benchmark.columns if column not in row]
        if missing:
            raise ValueError(
                f"Row {index} of {source} lacks the column(s) {missing} that {benchmark.name} needs "
                f"(it has {sorted(row)}; needed: {list(benchmark.columns)})."
            )
    return rows, source


def select_rows(
    rows: list[dict], num_samples: int = 0, fraction: float = 1.0, seed: int = 42
) -> list[tuple[int, dict]]:
    """(original index, row) pairs to evaluate: all rows in order, or the first `num_samples` (or `fraction`) of
    them after a shuffle with `seed` (the fork's sampling). `num_samples` and `fraction` < 1 exclude each other."""
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer (0: all rows), got {num_samples!r}.")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    if num_samples > 0 and fraction < 1:
        raise ValueError(
            f"Pass num_samples or fraction, not both (got num_samples={num_samples}, fraction={fraction})."
        )
    if num_samples > len(rows):
        raise ValueError(f"num_samples={num_samples} is more than the {len(rows)} rows of the dataset.")
    indices = list(range(len(rows)))
    if num_samples > 0 or fraction < 1:
        random.Random(seed).shuffle(indices)
        count = num_samples if num_samples > 0 else max(1, math.floor(len(rows) * fraction))
        indices = indices[:count]
    return [(index, rows[index]) for index in indices]
