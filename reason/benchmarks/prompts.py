# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Prompt pieces shared by the reasoning datasets (the fork's wording, without its stray escape characters)."""

from __future__ import annotations

from typing import Sequence

STEP_BY_STEP = 'Please reason step by step, and put your final answer within "\\boxed{}".'


def step_by_step(problem: str) -> str:
    """A problem followed, on its own line, by the instruction to reason step by step and box the answer."""
    return f"{str(problem).strip()}\n{STEP_BY_STEP}"


def numbered(options: Sequence[str]) -> str:
    """Options as lines "1. text", "2. text", ..."""
    return "\n".join(f"{index}. {str(option).strip()}" for index, option in enumerate(options, start=1))


def lettered(labels: Sequence[str], texts: Sequence[str]) -> str:
    """Choices as lines "A. text", ..."""
    if len(labels) != len(texts):
        raise ValueError(f"choices have {len(labels)} labels but {len(texts)} texts.")
    return "\n".join(f"{label}. {str(text).strip()}" for label, text in zip(labels, texts))


def choices_of(row: dict) -> tuple[list[str], list[str]]:
    """(labels, texts) of a `choices` column given as {"label": [...], "text": [...]}."""
    choices = row["choices"]
    if not isinstance(choices, dict) or "label" not in choices or "text" not in choices:
        raise ValueError(f'the "choices" column must be {{"label": [...], "text": [...]}}, got {choices!r:.120}.')
    return [str(label) for label in choices["label"]], [str(text) for text in choices["text"]]
