# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Everything `reason/` uses from the shared harness package (`harness/`), imported in this one module so that a moved
name is fixed here once.
"""

from harness.data import data_fingerprint, normalize_cells, read_jsonl
from harness.press_registry import PressSpec, UnknownNameError
from harness.process_group import ProcessGroup, wait_until_complete
from harness.reference_model import REFERENCE_MODEL_DIR
from harness.results import RunLock, atomic_write_json, atomic_write_text, check_inside


def synthetic_rows(task: str, num_samples: int, context_length: int, tokenizer=None, seed: int = 0) -> list[dict]:
    """Rows of a synthetic task of `harness.synthetic.tasks` (imported on first use)."""
    from harness.synthetic.tasks import generate_rows

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
    "wait_until_complete",
]
