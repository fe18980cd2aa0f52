# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Everything `kvzap/` uses from the shared harness package (`harness/`), the evaluation harness (`evaluation/`) and
the reference model's scripts (`reference/`), imported in this one module so that a moved name is fixed here once.
"""

from __future__ import annotations

from evaluation.benchmarks.aime25.calculate_metrics import calculate_metrics as aime25_metrics
from evaluation.data import load_synthetic
from evaluation.evaluate_registry import DATASET_REGISTRY, SCORER_REGISTRY
from harness.data import load_hub_dataset, load_local_dataset
from harness.reference_model import REFERENCE_MODEL_DIR, TRAINED_CONTEXT_LENGTH
from harness.synthetic.tasks import TASK_NAMES as SYNTHETIC_TASK_NAMES
from harness.synthetic.tasks import generate_rows as generate_synthetic_rows
from reference import write_report
from reference.evaluate import accuracy as synthetic_accuracy

__all__ = [
    "DATASET_REGISTRY",
    "REFERENCE_MODEL_DIR",
    "SCORER_REGISTRY",
    "SYNTHETIC_TASK_NAMES",
    "TRAINED_CONTEXT_LENGTH",
    "aime25_metrics",
    "generate_synthetic_rows",
    "load_hub_dataset",
    "load_local_dataset",
    "load_synthetic",
    "synthetic_accuracy",
    "write_report",
]
