# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""What the harnesses of this repository share (`evaluation/`, `reference/`, and the harnesses built on them).

The one idea: the dependency runs one way. Every harness imports this package; this package imports no harness, and
no harness imports another. It is not part of the `kvpress` wheel: like the harnesses, it is used from a checkout
(an editable install, or `PYTHONPATH=<repository root>`).

- `harness.reference_model`: where the shipped reference model lives (`REFERENCE_MODEL_DIR`) and the context length
  it was trained up to (`TRAINED_CONTEXT_LENGTH`).
- `harness.synthetic`: the synthetic long-context tasks (`tasks`, `words`) and their string-match score (`scoring`).
- `harness.data`: rows from a local file or folder or from the Hugging Face Hub, and fingerprints of rows.
- `harness.results`: run-folder safety (atomic writes, `RunLock`, path confinement, `PartialResults`, sharding).
- `harness.press_registry`: `PRESS_REGISTRY`, presses by name, built lazily.
"""
