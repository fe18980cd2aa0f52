# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""The math datasets' shared shape (GSM8K, MATH-500, AIME 2024 and 2025): one problem column, the step-by-step prompt,
the last boxed (or final) answer extracted, and scored with `math_equal` (numbers by value, LaTeX after
normalisation)."""

from __future__ import annotations

from typing import Callable, Optional

from reason.answers import extract_answer, math_equal
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import step_by_step


def answer_column(row: dict) -> str:
    """The gold answer of a dataset whose `answer` column holds it."""
    return str(row["answer"]).strip()


def math_score(extracted: str, gold: str) -> dict:
    return correct(math_equal(extracted, gold))


def math_benchmark(
    name: str,
    hub_id: str,
    columns: tuple[str, str] = ("problem", "answer"),
    gold_answer: Callable[[dict], str] = answer_column,
    subset: Optional[str] = None,
) -> Benchmark:
    """A math dataset's `Benchmark`: the prompt is `columns[0]` followed by the step-by-step instruction."""
    problem = columns[0]
    return Benchmark(
        name=name,
        hub_id=hub_id,
        subset=subset,
        split="test",
        columns=columns,
        format_prompt=lambda row: step_by_step(row[problem]),
        gold_answer=gold_answer,
        extract=extract_answer,
        score=math_score,
    )
