# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Result files that survive interruptions, and the sharding of rows across data-parallel processes.

The one idea: every answered row is appended at once, as one JSON line flushed to disk, to the process's own shard
file (`partial/rank{r}.jsonl`); a rerun reads every shard and skips the rows already answered, so an interrupt loses
at most the rows in flight and never duplicates one. When all shards are done, the main process merges them into
`predictions.csv` and `metrics.json`, each written atomically (a temporary file renamed over the target).

A run folder is locked while a run writes to it (`RunLock`: a file created with O_EXCL that names its process), and
nothing is written or deleted outside the output directory (`check_inside`, `remove_inside`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, TypeVar, Union

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


def check_inside(path: Union[str, Path], root: Union[str, Path]) -> Path:
    """`path`, after checking that it resolves (symbolic links and `..` followed) to `root` or a path inside it."""
    resolved, resolved_root = Path(path).resolve(), Path(root).resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise ValueError(
            f"Refusing to write or delete {path}: it resolves to {resolved}, outside the output directory "
            f"{resolved_root}. Every file of a run stays under --output_dir; check the options that name the run "
            "(data_dir, data_path, model) and any symbolic link inside the output directory."
        )
    return Path(path)


def remove_inside(path: Union[str, Path], root: Union[str, Path]) -> None:
    """Delete a file or a folder tree, only after checking that it lies inside `root`."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        check_inside(path.parent, root)  # the link itself is removed, never what it points to
        path.unlink()
    else:
        check_inside(path, root)
        shutil.rmtree(path)


class RunLockedError(RuntimeError):
    """Another live run holds the lock of a run folder."""


def _process_is_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder: `path` is created with O_CREAT | O_EXCL (atomic: exactly one process can
    create it) and holds the owner's pid, host, a random token and when it was taken.

    A lock whose process is dead (same host, pid gone) is stale and taken over: it is renamed aside (atomic, so two
    processes cannot both take it), checked to be the same stale lock, and removed before the lock is created again.
    A lock of another host cannot be checked and is always respected. `release` removes the file only if it is still
    this lock (same token).
    """

    # A lock file without a readable owner (a process died between creating and writing it) is stale after this.
    UNREADABLE_STALE_SECONDS = 60.0

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self.held = False

    def _content(self) -> str:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "token": self.token,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300],
            }
        )

    @staticmethod
    def read_owner(path: Path) -> Optional[dict]:
        """The owner recorded in a lock file (None when the file is gone, empty or unreadable)."""
        try:
            owner = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def _is_stale(self, owner: Optional[dict]) -> bool:
        if owner is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return False  # released meanwhile: simply try again
            return age > self.UNREADABLE_STALE_SECONDS
        if owner.get("host") != socket.gethostname():
            return False
        pid = owner.get("pid")
        return isinstance(pid, int) and not _process_is_alive(pid)

    def _take_over(self, seen: str) -> None:
        """Remove the stale lock whose text is `seen`, unless another process replaced it meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_text(encoding="utf-8") != seen:
                # A live lock taken a moment ago by another process: put it back.
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
        finally:
            aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lock, or raise RunLockedError naming the live run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    seen = self.path.read_text(encoding="utf-8")
                except FileNotFoundError:
                    continue
                owner = self.read_owner(self.path)
                if not self._is_stale(owner):
                    raise RunLockedError(self._held_message(owner)) from None
                logger.warning("Taking over the stale lock %s (its process %s is gone).", self.path, owner)
                self._take_over(seen)
                continue
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(self._content())
                file.flush()
                os.fsync(file.fileno())
            self.held = True
            return
        raise RunLockedError(self._held_message(self.read_owner(self.path)))

    def _held_message(self, owner: Optional[dict]) -> str:
        who = "Another run"
        if owner is not None:
            who = f"Another run (pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')})"
        return (
            f"{who} is writing to {self.path.parent} and holds its lock {self.path}. Wait for it to finish or stop "
            f"it, or choose another --output_dir; if no such process exists any more, delete {self.path}."
        )

    def release(self) -> None:
        """Remove the lock file if it is still this lock."""
        if not self.held:
            return
        owner = self.read_owner(self.path)
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


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
