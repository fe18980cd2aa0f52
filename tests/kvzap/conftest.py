# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures of the kvzap tests: the reference model, its tokenizer and a tiny local text file."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvzap.shared import REFERENCE_MODEL_DIR, generate_synthetic_rows

TASKS = ("niah_single_essay", "variable_tracking", "common_words", "niah_multikey", "frequent_words")


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(REFERENCE_MODEL_DIR))


@pytest.fixture(scope="session")
def reference_model():
    return AutoModelForCausalLM.from_pretrained(str(REFERENCE_MODEL_DIR)).eval()


def tiny_texts(tokenizer, lengths=(120, 130, 140, 125, 135)) -> list[str]:
    """Five synthetic contexts of about 130 tokens (one per task of TASKS)."""
    return [
        generate_synthetic_rows(task, 1, length, tokenizer, seed=300 + i)[0]["context"].strip()
        for i, (task, length) in enumerate(zip(TASKS, lengths))
    ]


@pytest.fixture(scope="session")
def tiny_text_file(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("kvzap-text") / "tiny.txt"
    path.write_text("\n\n".join(tiny_texts(tokenizer)) + "\n", encoding="utf-8")
    return path
