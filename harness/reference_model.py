# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Where the project's reference models are shipped, and the context lengths they were trained up to.

The one idea: harnesses and tests find the model by this constant, without importing `reference/` (which trains
it). `REFERENCE_MODEL_32K_DIR` is the long-context checkpoint (`reference/train.py --recipe long32k`, continued
from the first to `LONG_CONTEXT_LENGTH` tokens); a partial copy of the repository may lack it, so code and tests
check that it exists (`long_context_model_dir` raises FileNotFoundError otherwise) before using it. Load either with
`AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)` or
`pipeline("kv-press-text-generation", model=str(REFERENCE_MODEL_DIR))`; `reference/train.py` reproduces both.
"""

from __future__ import annotations

from pathlib import Path

# config.json, model.safetensors and the tokenizer files of the shipped checkpoint.
REFERENCE_MODEL_DIR: Path = Path(__file__).resolve().parents[1] / "reference" / "model"
# Context length (tokens of the task context) the model was trained up to.
TRAINED_CONTEXT_LENGTH: int = 1024

# The long-context checkpoint (config.json, model.safetensors, tokenizer files) and the length it reads.
REFERENCE_MODEL_32K_DIR: Path = REFERENCE_MODEL_DIR.parent / "model-32k"
LONG_CONTEXT_LENGTH: int = 32768


def long_context_model_dir() -> Path:
    """`REFERENCE_MODEL_32K_DIR`, or FileNotFoundError saying how to make it when it is not there."""
    if not (REFERENCE_MODEL_32K_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"The long-context reference model is not in {REFERENCE_MODEL_32K_DIR}: train it with "
            "`python reference/train.py --recipe long32k --output_dir RUN` on a GPU, then export it with "
            f"`python reference/train.py --resume RUN/resume --export_to {REFERENCE_MODEL_32K_DIR}` "
            "(reference/README.md)."
        )
    return REFERENCE_MODEL_32K_DIR


__all__ = [
    "LONG_CONTEXT_LENGTH",
    "REFERENCE_MODEL_32K_DIR",
    "REFERENCE_MODEL_DIR",
    "TRAINED_CONTEXT_LENGTH",
    "long_context_model_dir",
]
