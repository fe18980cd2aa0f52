# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Result files that survive interruptions, and the sharding of rows across data-parallel processes.

The one idea: every answered row is appended at once, as one JSON line flushed to disk, to the process's own shard
file (`partial/rank{r}.jsonl`); a rerun reads every shard and skips the rows already answered, so an interrupt loses
at most the rows in flight and never duplicates one. When all shards are done, the main process merges them into
`predictions.csv` and `metrics.json`, each written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import pandas as pd

logger = logging.getLogger(__name__)

T = TypeVar("T")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=4, default=_json_default) + "\n")


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in metrics."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of process `rank` out of `world_size`: every world_size-th item, starting at `rank`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world={world_size}.")
    return list(items[rank::world_size])


class PartialResults:
    """The rows answered so far, as JSON lines in `<results_dir>/partial/rank{r}.jsonl` (one file per process)."""

    def __init__(self, results_dir: Path):
        self.directory = Path(results_dir) / "partial"

    def path(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.jsonl"

    def append(self, rank: int, records: Iterable[dict]) -> None:
        """Append records and force them to disk before returning."""
        path = self.path(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record, default=_json_default) + "\n" for record in records)
        with open(path, "a+b") as file:
            file.seek(0, os.SEEK_END)
            if file.tell() > 0:
                file.seek(-1, os.SEEK_END)
                if file.read(1) != b"\n":  # the previous run died in the middle of a line
                    lines = "\n" + lines
            file.write(lines.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())

    def read(self) -> dict[int, dict]:
        """Every complete record of every shard, by `row_id` (a later record of the same row wins)."""
        records: dict[int, dict] = {}
        if not self.directory.exists():
            return records
        for path in sorted(self.directory.glob("rank*.jsonl")):
            with open(path, encoding="utf-8") as file:
                for line in file:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        logger.warning("Ignoring an incomplete line of %s (interrupted write).", path)
                        continue
                    records[int(record["row_id"])] = record
        return records

    def exists(self) -> bool:
        return self.directory.exists() and any(self.directory.glob("rank*.jsonl"))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def merge_predictions(df: pd.DataFrame, records: dict[int, dict]) -> pd.DataFrame:
    """`df` with the `predicted_answer` and `compression_ratio` of `records`; every row must have a record."""
    missing = [row_id for row_id in df["row_id"] if int(row_id) not in records]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(df)} rows have no prediction (first row ids: {missing[:10]}); a process did not "
            "finish. Run the same command again to complete them."
        )
    df = df.copy()
    df["predicted_answer"] = [records[int(row_id)]["predicted_answer"] for row_id in df["row_id"]]
    df["compression_ratio"] = [records[int(row_id)].get("compression_ratio") for row_id in df["row_id"]]
    return df
