# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Registries of the evaluation harness: datasets and their metrics, and (re-exported) the press names.

The one idea: every name upstream's `evaluate_registry.py` knows is importable from here, but nothing is imported
until it is used. `SCORER_REGISTRY[name]` imports the benchmark's `calculate_metrics` on first use. The presses
(`PRESS_REGISTRY`, `PressSpec`, ...) live in `harness.press_registry`, shared with the other harnesses and
`kvpress.benchmark`; they are re-exported here so that upstream's `from evaluation.evaluate_registry import
PRESS_REGISTRY` keeps working.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Callable, Iterator, Optional

from harness.press_registry import (
    PRESS_REGISTRY,
    PRESS_SPECS,
    NotAvailableError,
    PressNotAvailableError,
    PressRegistry,
    PressSpec,
    UnknownNameError,
)

# Dataset name -> Hugging Face Hub id (loaded with `data_dir` and split "test"). `synthetic` rows are generated
# locally by `harness.synthetic.tasks` (no Hub id).
DATASET_REGISTRY: dict[str, Optional[str]] = {
    "loogle": "simonjegou/loogle",
    "ruler": "simonjegou/ruler",
    "zero_scrolls": "simonjegou/zero_scrolls",
    "infinitebench": "MaxJeblick/InfiniteBench",
    "longbench": "Xnhyacinth/LongBench",
    "longbench-e": "Xnhyacinth/LongBench",
    "longbench-v2": "simonjegou/LongBench-v2",
    "needle_in_haystack": "alessiodevoto/paul_graham_essays",
    "aime25": "alessiodevoto/aime25",
    "math500": "alessiodevoto/math500",
    "synthetic": None,
}

# Dataset name -> "module:function" of its metric (module relative to `evaluation.benchmarks`).
SCORER_PATHS: dict[str, str] = {
    "loogle": "loogle.calculate_metrics:calculate_metrics",
    "ruler": "ruler.calculate_metrics:calculate_metrics",
    "zero_scrolls": "zero_scrolls.calculate_metrics:calculate_metrics",
    "infinitebench": "infinite_bench.calculate_metrics:calculate_metrics",
    "longbench": "longbench.calculate_metrics:calculate_metrics",
    "longbench-e": "longbench.calculate_metrics:calculate_metrics_e",
    "longbench-v2": "longbenchv2.calculate_metrics:calculate_metrics",
    "needle_in_haystack": "needle_in_haystack.calculate_metrics:calculate_metrics",
    "aime25": "aime25.calculate_metrics:calculate_metrics",
    "math500": "math500.calculate_metrics:calculate_metrics",
    "synthetic": "synthetic.calculate_metrics:calculate_metrics",
}


class ScorerRegistry(Mapping):
    """`SCORER_REGISTRY[dataset]` imports and returns the dataset's `calculate_metrics(df)` function."""

    def __init__(self, paths: dict[str, str]):
        self._paths = paths

    def __getitem__(self, name: str) -> Callable:
        if name not in self._paths:
            raise UnknownNameError(f"Unknown dataset {name!r}; valid dataset names: {', '.join(sorted(self._paths))}.")
        module_path, function_name = self._paths[name].split(":")
        module_name = f"evaluation.benchmarks.{module_path}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                raise NotAvailableError(
                    f"The metric of dataset {name!r} is not available in this version: {module_name} does not exist."
                ) from error
            raise
        return getattr(module, function_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


SCORER_REGISTRY = ScorerRegistry(SCORER_PATHS)

# The data_dir used when none is given (upstream's YAML hard-codes "4096", which is wrong for every other dataset).
DEFAULT_DATA_DIR: dict[str, str] = {"ruler": "4096", "longbench-v2": "0shot", "synthetic": "niah_single_noise"}

# Columns each dataset needs besides `context` and `question` (`answer_prefix` defaults to "", `max_new_tokens`
# can come from the command line).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "loogle": ("answer", "task"),
    "ruler": ("answer", "task"),
    "zero_scrolls": ("task",),
    "infinitebench": ("answer", "task"),
    "longbench": ("answers", "task"),
    "longbench-e": ("answers", "task", "length"),
    "longbench-v2": ("answer",),
    "needle_in_haystack": ("needle",),
    "aime25": ("answer",),
    "math500": ("answer",),
    "synthetic": ("answer", "task"),
}

__all__ = [
    "DATASET_REGISTRY",
    "DEFAULT_DATA_DIR",
    "NotAvailableError",
    "PRESS_REGISTRY",
    "PRESS_SPECS",
    "PressNotAvailableError",
    "PressRegistry",
    "PressSpec",
    "REQUIRED_COLUMNS",
    "SCORER_PATHS",
    "SCORER_REGISTRY",
    "ScorerRegistry",
    "UnknownNameError",
]
