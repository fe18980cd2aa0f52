# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Everything `reason/` uses from `evaluation/` and `reference/`, imported in this one module.

The one idea: the shared harness code may move; only the imports below then need to change.
"""

from evaluation.data import data_fingerprint, normalize_cells, read_jsonl
from evaluation.evaluate import ProcessGroup
from evaluation.evaluate_registry import PressSpec, UnknownNameError
from evaluation.results import RunLock, atomic_write_json, atomic_write_text, check_inside
from reference import REFERENCE_MODEL_DIR


def synthetic_rows(task: str, num_samples: int, context_length: int, tokenizer=None, seed: int = 0) -> list[dict]:
    """Rows of a synthetic task of `evaluation.benchmarks.synthetic.tasks` (imported on first use)."""
    from evaluation.benchmarks.synthetic.tasks import generate_rows

    return generate_rows(task, num_samples, context_length, tokenizer=tokenizer, seed=seed)


__all__ = [
    "PressSpec",
    "ProcessGroup",
    "REFERENCE_MODEL_DIR",
    "RunLock",
    "UnknownNameError",
    "atomic_write_json",
    "atomic_write_text",
    "check_inside",
    "data_fingerprint",
    "normalize_cells",
    "read_jsonl",
    "synthetic_rows",
]
