# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The results of one run: its folder, `predictions.jsonl` written as it goes, and `metrics.json`.

The one idea: every answered sample is appended at once as one JSON line, flushed and synced, so a killed run loses
at most the sample in flight; a resumed run reads the file back (an incomplete last line is ignored, a sample is
never counted twice) and answers only the rest. In a data-parallel run each process appends to its own
`predictions.rank{r}.jsonl`; when every sample has a line, the main process merges them into `predictions.jsonl`
(sorted by sample, written atomically). The fork kept records in memory and wrote them only at the end or on a
signal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from reason.shared import atomic_write_text
from reason.telemetry import MEMORY_KEYS

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
# Per-sample numbers averaged into metrics.json as mean_<key> (when present).
MEAN_KEYS = (
    "input_token_count",
    "output_token_count",
    "total_token_count",
    "kept_cache_mean",
    "kept_cache_max",
    "compression_ratio",
    "execution_time",
    "end_to_end_tokens_per_second",
    "prefill_time",
    "decoding_time",
    "total_time",
    "total_prefill_tokens",
    "total_decoding_tokens",
    "output_tokens_per_second",
    "peak_memory_bytes",
    *MEMORY_KEYS,
)


def name_component(value) -> str:
    """`value` as a piece of a folder name: "/" -> "--", anything but letters, digits, "._-" -> "_"."""
    text = str(value).replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"


def run_name(settings: dict) -> str:
    """The run folder's name, from the settings that change results (the fork's file stem, extended)."""
    parts = [
        settings["dataset"],
        _model_tag(settings["model"]),
        settings["press_name"],
        f"budget{settings['cache_budget']}",
        f"max_new_tokens{settings['max_new_tokens']}",
    ]
    if settings.get("data_path"):
        parts.insert(1, "local-" + name_component(Path(settings["data_path"]).stem))
    if settings.get("data_split"):
        parts.insert(1, name_component(settings["data_split"]))
    if settings.get("num_samples"):
        parts.append(f"num_samples{settings['num_samples']}")
    elif settings.get("fraction", 1.0) < 1:
        parts.append(f"fraction{settings['fraction']:.2f}")
    if settings.get("max_context_length"):
        parts.append(f"max_context{settings['max_context_length']}")
    if settings.get("do_sampling"):
        parts.append(f"sampling_t{settings['temperature']}_p{settings['top_p']}")
    if settings.get("chat_template") is False:
        parts.append("raw_prompt")
    parts.append(f"seed{settings['random_seed']}")
    return "__".join(name_component(part) for part in parts)


def _model_tag(model: str) -> str:
    """A Hub id as "org--name"; a local model folder as "<parent>-<folder>" (reference/model -> reference-model)."""
    path = Path(model)
    if path.exists():
        return name_component(f"{path.parent.name}-{path.name}")
    return name_component(model)


class PredictionLog:
    """The prediction lines of a run folder: `predictions.jsonl`, or one file per process of a data-parallel run."""

    def __init__(self, run_dir: Path, rank: int = 0, world_size: int = 1):
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size

    @property
    def path(self) -> Path:
        name = PREDICTIONS if self.world_size == 1 else f"predictions.rank{self.rank}.jsonl"
        return self.run_dir / name

    def files(self) -> list[Path]:
        return [self.run_dir / PREDICTIONS] + sorted(self.run_dir.glob("predictions.rank*.jsonl"))

    def append(self, record: dict) -> None:
        """Append one record as a JSON line, on disk before this returns."""
        line = (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a killed run left half a line: start a new one
                    line = b"\n" + line
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> dict[int, dict]:
        """Every complete record of every prediction file, by `sample_id` (first one kept)."""
        records: dict[int, dict] = {}
        for path in self.files():
            if not path.exists():
                continue
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        logger.warning("Ignoring line %d of %s: incomplete (the run was killed there).", number, path)
                        continue
                    sample_id = int(record["sample_id"])
                    if sample_id in records:
                        logger.warning("Sample %d appears twice in %s; keeping the first.", sample_id, path)
                        continue
                    records[sample_id] = record
        return records

    def merge(self, records: dict[int, dict]) -> None:
        """Write every record, sorted by sample, to `predictions.jsonl` (atomically) and remove the per-process
        files."""
        text = "".join(
            json.dumps(records[key], ensure_ascii=False, default=_json_default) + "\n" for key in sorted(records)
        )
        atomic_write_text(self.run_dir / PREDICTIONS, text)
        for path in self.run_dir.glob("predictions.rank*.jsonl"):
            path.unlink()

    def set_aside(self) -> Optional[Path]:
        """Rename existing predictions (a fresh start without --resume) to predictions.old<N>.jsonl; never delete."""
        moved = None
        for path in self.files():
            if path.exists():
                number = 0
                while (self.run_dir / f"{path.stem}.old{number}.jsonl").exists():
                    number += 1
                moved = path.rename(self.run_dir / f"{path.stem}.old{number}.jsonl")
                logger.warning("Starting over: the earlier predictions %s were moved to %s.", path, moved)
        return moved


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _mean(values: Iterable) -> Optional[float]:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    numbers = [v for v in numbers if math.isfinite(v)]
    return sum(numbers) / len(numbers) if numbers else None


def compute_metrics(records: list[dict], score_keys: Iterable[str]) -> dict:
    """Means over the samples: `accuracy` (of `correct`), the dataset's other scores (e.g. DROP's `f1`), and
    `mean_<key>` of the telemetry (MEAN_KEYS present in the records). `num_samples` is the number of records (the
    fork wrote the --num_samples value, 0 for a whole dataset)."""
    metrics: dict = {"num_samples": len(records), "accuracy": _mean(r.get("correct") for r in records) or 0.0}
    for key in score_keys:
        if key != "correct":
            metrics[key] = _mean(r.get("scores", {}).get(key) for r in records)
    metrics["stop_reasons"] = {}
    for record in records:
        reason = record.get("stop_reason", "unknown")
        metrics["stop_reasons"][reason] = metrics["stop_reasons"].get(reason, 0) + 1
    for key in MEAN_KEYS:
        mean = _mean(r.get(key) for r in records)
        if mean is not None:
            metrics[f"mean_{key}"] = mean
    return metrics


def score_table(rows: list[dict]) -> str:
    """A plain-text table of runs: dataset, press, budget, samples, accuracy, kept cache and trace length."""
    header = ("dataset", "press", "budget", "samples", "accuracy", "kept cache", "trace tokens", "s/sample")
    lines = [header]
    for row in rows:
        metrics = row["metrics"]
        lines.append(
            (
                str(row["dataset"]),
                str(row["press_name"]),
                str(row["cache_budget"]),
                str(metrics["num_samples"]),
                f"{100 * metrics['accuracy']:.2f}",
                f"{metrics.get('mean_kept_cache_mean', float('nan')):.1f}",
                f"{metrics.get('mean_output_token_count', float('nan')):.1f}",
                f"{metrics.get('mean_execution_time', float('nan')):.2f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)
