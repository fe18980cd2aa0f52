# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The project's own small reference model, trained from scratch on the synthetic long-context tasks.

The one idea: a tiny Llama that really retrieves from long contexts (RULER-style tasks,
https://arxiv.org/abs/2404.06654) ships with the repository, so press quality can be measured offline, on CPU.
Load it with `AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)` or
`pipeline("kv-press-text-generation", model=str(REFERENCE_MODEL_DIR))`; `reference/train.py` reproduces it.
"""

from __future__ import annotations

from pathlib import Path

# config.json, model.safetensors and the tokenizer files of the shipped checkpoint.
REFERENCE_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"
# Context length (tokens of the task context) the model was trained up to.
TRAINED_CONTEXT_LENGTH: int = 1024

__all__ = ["REFERENCE_MODEL_DIR", "TRAINED_CONTEXT_LENGTH"]
