# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Where the project's reference model is shipped, and the context length it was trained up to.

The one idea: harnesses and tests find the model by this constant, without importing `reference/` (which trains
it). Load it with `AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)` or
`pipeline("kv-press-text-generation", model=str(REFERENCE_MODEL_DIR))`; `reference/train.py` reproduces it.
"""

from __future__ import annotations

from pathlib import Path

# config.json, model.safetensors and the tokenizer files of the shipped checkpoint.
REFERENCE_MODEL_DIR: Path = Path(__file__).resolve().parents[1] / "reference" / "model"
# Context length (tokens of the task context) the model was trained up to.
TRAINED_CONTEXT_LENGTH: int = 1024

__all__ = ["REFERENCE_MODEL_DIR", "TRAINED_CONTEXT_LENGTH"]
