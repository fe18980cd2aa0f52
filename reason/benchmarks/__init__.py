# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The reasoning datasets, one module each: `reason/benchmarks/<name>.py` defines `BENCHMARK`.

The one idea: a dataset is its Hub id (subset, split), the columns it needs, a prompt formatter, a gold-answer
reader, an extractor and a scorer; the harness knows nothing else about it. Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

# name -> module of reason.benchmarks (the fork's dataset keys, plus the offline synthetic task)
BENCHMARK_NAMES: tuple[str, ...] = (
    "gsm8k",
    "math500",
    "aime24",
    "aime25",
    "folio",
    "strategyqa",
    "logiqa",
    "reclor",
    "openbookqa",
    "commonsenseqa",
    "drop",
    "synthetic",
)


@dataclass(frozen=True)
class Benchmark:
    """How to evaluate one dataset.

    `score(extracted, gold)` returns a dict of per-sample metrics that has `correct` (0.0 or 1.0); the run's
    metrics are their means (`accuracy` is the mean of `correct`). `make_rows(num_samples, seed, tokenizer)`
    generates the rows of a dataset without a Hub id (the synthetic task).
    """

    name: str
    hub_id: Optional[str]
    subset: Optional[str]
    split: str
    columns: tuple[str, ...]
    format_prompt: Callable[[dict], str]
    gold_answer: Callable[[dict], Any]
    extract: Callable[[str], str]
    score: Callable[[str, Any], dict]
    make_rows: Optional[Callable[..., list]] = None


def get_benchmark(name: str) -> Benchmark:
    """The `BENCHMARK` of `reason/benchmarks/<name>.py`; ValueError naming the valid names for another name."""
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets: {', '.join(BENCHMARK_NAMES)}.")
    return importlib.import_module(f"reason.benchmarks.{name}").BENCHMARK


def correct(value: bool) -> dict:
    """The per-sample score of a right/wrong scorer."""
    return {"correct": float(bool(value))}
