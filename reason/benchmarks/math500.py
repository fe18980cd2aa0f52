# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""MATH-500 (HuggingFaceH4/MATH-500, split test): competition problems with LaTeX answers.

Gold: the `answer` column. Scored with `math_equal` (numbers by value, LaTeX after normalisation: `\\dfrac{1}{2}`
equals `0.5`); the fork compared raw strings."""

from reason.answers import extract_answer, math_equal
from reason.benchmarks import Benchmark, correct
from reason.benchmarks.prompts import step_by_step

BENCHMARK = Benchmark(
    name="math500",
    hub_id="HuggingFaceH4/MATH-500",
    subset=None,
    split="test",
    columns=("problem", "answer"),
    format_prompt=lambda row: step_by_step(row["problem"]),
    gold_answer=lambda row: str(row["answer"]).strip(),
    extract=extract_answer,
    score=lambda extracted, gold: correct(math_equal(extracted, gold)),
)
